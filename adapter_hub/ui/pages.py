"""The pages: tasks and adapters, an adapter's versions, a version, its lineage, and the metric comparison.
Each page makes the Hub calls the CLI's ls / versions / show / lineage / metrics make (plus the bulk queries of
overview.py) and renders a template; every stored string is escaped by Jinja's autoescaping."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, current_app, render_template, request, url_for

from ..registry import Hub, NotFound, Problem, RegistryError
from ..registry.refs import check_name
from . import charts, graph, overview

pages = Blueprint("pages", __name__)

MAX_COMPARED = 50  # versions on one compare page: a table column and a bar each
PER_TASK = 25  # adapters a task shows on the overview; the task's own page lists them all, PER_PAGE a page
PER_PAGE = 100  # adapters on a page of a task, versions on a page of an adapter
MAX_LINEAGE = 100  # versions the lineage page shows: the nearest ancestors and descendants


def _hub() -> Hub:
    return current_app.config["REGISTRY"].hub()  # type: ignore[no-any-return]


def _named(kind: str, name: str) -> str:
    """NAME from a URL, if the registry could hold it: a name it never could is simply not found."""
    try:
        return check_name(kind, name)
    except RegistryError as exc:
        raise NotFound(str(exc)) from None


def version_url(ref: str) -> str:
    return url_for("pages.version", ref=ref)


def _page_number() -> int:
    """The ?page= of the request (1 when absent)."""
    text = request.args.get("page", "1")
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 10**9:
        raise RegistryError(f"page must be a whole number from 1, got {text[:40]!r}")
    return int(text)


@dataclass(frozen=True)
class Pager:
    """The links between the pages of a long list: the first, the last and the ones near this one."""

    page: int
    pages: int
    first: int  # the position (from 1) of this page's first item
    last: int  # and of its last
    total: int

    @property
    def links(self) -> list[tuple[int, str] | None]:
        """(page number, its URL) to show, None for a gap."""
        near = sorted({1, self.pages, *range(max(1, self.page - 2), min(self.pages, self.page + 2) + 1)})
        out: list[tuple[int, str] | None] = []
        for i, n in enumerate(near):
            if i and n > near[i - 1] + 1:
                out.append(None)
            out.append((n, self.url(n)))
        return out

    @staticmethod
    def url(n: int) -> str:
        args = {k: v for k, v in request.args.items() if k != "page"}
        return url_for(request.endpoint or "pages.index", **(request.view_args or {}), **args, page=n)


def _pager(page: int, total: int, shown: int) -> Pager:
    pages = max(1, -(-total // PER_PAGE))
    if page > pages:
        raise NotFound(f"there is no page {page}: {total} items make {pages} page{'s' if pages > 1 else ''}")
    first = (page - 1) * PER_PAGE + 1
    return Pager(page, pages, first if shown else 0, first + shown - 1, total)


@pages.get("/")
def index() -> str:
    return _tasks(None)


@pages.get("/tasks/<name>")
def task(name: str) -> str:
    return _tasks(_named("task", name))


def _tasks(task: str | None) -> str:
    hub = _hub()
    filters = overview.Filters(
        text=request.args.get("q", "")[:200], tag=request.args.get("tag", "")[:400],
        backbone=request.args.get("backbone", "")[:200],
    )  # fmt: skip
    # no stored text holds a NUL character (limits.py), and PostgreSQL refuses one in a query
    if "\x00" in filters.text + filters.tag + filters.backbone:
        raise RegistryError("a filter cannot contain a NUL character")
    pager = None
    if task is None:
        groups = overview.overview(hub, None, filters, limit=PER_TASK)
    else:
        page = _page_number()
        groups = overview.overview(hub, task, filters, limit=PER_PAGE, offset=(page - 1) * PER_PAGE)
        listed = groups[0] if groups else None
        total = listed.skipped + len(listed.adapters) + listed.more if listed else 0
        pager = _pager(page, total, len(listed.adapters) if listed else 0)
    return render_template("tasks.html", groups=groups, filters=filters, task=task, pager=pager,
                           backbones=[b.name for b in hub.backbones()])  # fmt: skip


@pages.get("/adapters/<task>/<adapter>")
def adapter(task: str, adapter: str) -> str:
    hub = _hub()
    task, adapter = _named("task", task), _named("adapter", adapter)
    page = _page_number()
    listed = overview.adapter_versions(hub, task, adapter, offset=(page - 1) * PER_PAGE, limit=PER_PAGE)
    return render_template("adapter.html", task=hub.task(task), adapter=adapter, listed=listed,
                           pager=_pager(page, listed.total, len(listed.versions)),
                           label=charts.metric_label)  # fmt: skip


@pages.get("/versions/<path:ref>")
def version(ref: str) -> str:
    return _version(ref, verified=None)


@pages.post("/verify/<path:ref>")
def verify(ref: str) -> str:
    """Check the version's artifact against its digest: reads the blob, writes nothing."""
    hub = _hub()
    v = hub.resolve(ref, include_deleted=True)
    if v.status == "purged":  # gc freed its blob: there is nothing to check, and nothing is missing
        return _version(v.ref, verified=None, purged=True)
    return _version(v.ref, verified=hub.verify(v.ref))


def _version(ref: str, verified: list[Problem] | None, *, purged: bool = False) -> str:
    hub = _hub()
    v = hub.resolve(ref, include_deleted=True)
    parents, children = overview.direct_edges(hub, v.ref)
    recipe = [e for e in parents if e.relation == "composed_from"]
    return render_template("version.html", v=v, backbone=hub.backbone(v.backbone), parents=parents,
                           children=children, recipe=recipe, metrics=hub.metrics(v.ref), verified=verified,
                           task=hub.task(v.task), edge_label=graph.edge_label, verify_purged=purged)  # fmt: skip


@pages.get("/lineage/<path:ref>")
def lineage(ref: str) -> str:
    hub = _hub()
    v = hub.resolve(ref, include_deleted=True)
    near = overview.near_lineage(hub, v.ref, MAX_LINEAGE)
    drawing = graph.draw(near.lineage, version_url)
    return render_template("lineage.html", v=v, lineage=near.lineage, left_out=near.left_out, drawing=drawing,
                           edge_label=graph.edge_label, colours=graph.RELATION_COLOURS)  # fmt: skip


@pages.get("/compare")
def compare() -> str:
    hub = _hub()
    refs = list(dict.fromkeys(r.strip() for r in request.args.getlist("ref") if r.strip()))
    if len(refs) > MAX_COMPARED:
        raise RegistryError(f"{len(refs)} versions picked: compare at most {MAX_COMPARED} at once")
    names = [n for n in dict.fromkeys(request.args.getlist("metric")) if n.strip()]
    table = bar = steps = None
    metric_names: list[str] = []
    if refs:
        table = hub.compare_metrics(refs, names or None)  # as `adapter-hub metrics REF... --metric NAME...`
        metric_names, stepped = overview.compared_metrics(hub, table.refs, names)
        bar, steps = charts.bar_charts(table), charts.step_charts(stepped, table.refs)
    picked = table.refs if table is not None else []
    task_name = request.args.get("task") or (picked[0].split("/")[0] if picked else None)
    task = hub.task(_named("task", task_name)) if task_name else None
    picker = overview.task_versions(hub, task.name) if task is not None else {}
    tasks = [t.name for t in hub.tasks()] if task is None else []
    return render_template("compare.html", task=task, tasks=tasks, table=table, bar=bar, steps=steps, picker=picker,
                           picked=set(picked), metric_names=metric_names, chosen=set(names),
                           mixed=len({r.split("/")[0] for r in picked}) > 1, label=charts.metric_label)  # fmt: skip
