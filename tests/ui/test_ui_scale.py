"""The web view on big and changing registries: an adapter's versions and a task's adapters come a page at a
time from a few queries whatever their number; the best value a page marks is the one `adapter-hub metrics`
marks, among live versions only; a task created while the overview reads is no error; and a server on a loopback
address answers only to loopback host names (no DNS rebinding)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import seeded_backbone
from ui_registry import _adapter
from ui_registry import more_versions as _more_versions

pytest.importorskip("flask", reason="the web view needs the ui extra")

from sqlalchemy import event, update  # noqa: E402

from adapter_hub.model import AdapterModel  # noqa: E402
from adapter_hub.registry import Hub  # noqa: E402
from adapter_hub.registry.models import VersionRow  # noqa: E402
from adapter_hub.ui import create_app, overview  # noqa: E402
from adapter_hub.ui.app import trusted_hosts  # noqa: E402


def _registry(home: Path, url: str, adapters: int = 1) -> tuple[Hub, list[str]]:
    """At HOME: task t (metric accuracy, higher is better) with ADAPTERS adapters of one version each."""
    hub = Hub.open(home, url)
    model = AdapterModel(seeded_backbone(0))
    hub.add_backbone("bb", model)
    hub.add_task("t", metric="accuracy")
    _adapter(model, "lora", 1)
    refs = [hub.register(model, "lora", task="t", name=f"a{i:04d}").ref for i in range(adapters)]
    return hub, refs


def more_versions(hub: Hub, ref: str, values: list[float | None], *, split: str | None = None) -> list[str]:
    return _more_versions(hub, ref, values, metric="accuracy", split=split)


@contextmanager
def _statements(hub: Hub) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(hub.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(hub.engine, "before_cursor_execute", count)


def _rows(html: str) -> list[str]:
    return html.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]


def _set_status(hub: Hub, refs: list[str], status: str) -> None:
    numbers = [int(r.rsplit(":", 1)[1]) for r in refs]
    with hub._session(write=True) as s:
        s.execute(update(VersionRow).where(VersionRow.number.in_(numbers)).values(status=status))


def test_an_adapter_of_a_thousand_versions_is_read_in_a_few_queries_a_page_at_a_time(tmp_path: Path) -> None:
    hub, (first,) = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")
    more_versions(hub, first, [0.5 + i / 10_000 for i in range(999)])
    client = create_app(hub=hub).test_client()
    client.get("/adapters/t/a0000")  # the registry opened, the templates compiled
    with _statements(hub) as seen:
        html = client.get("/adapters/t/a0000").get_data(as_text=True)
    assert len(seen) <= 20, seen  # it was 2 a version: 2,020
    rows = _rows(html)
    assert len(rows) == 100 and 'value="t/a0000:1000"' in rows[0] and 'value="t/a0000:901"' in rows[99]
    assert "1–100 of 1000 versions" in html and 'href="/adapters/t/a0000?page=10">10<' in html
    last = client.get("/adapters/t/a0000?page=10").get_data(as_text=True)
    assert 'value="t/a0000:100"' in _rows(last)[0] and 'value="t/a0000:1"' in _rows(last)[-1]
    assert client.get("/adapters/t/a0000?page=11").status_code == 404
    assert client.get("/adapters/t/a0000?page=x").status_code == 400
    hub.close()


def test_the_best_is_marked_among_all_live_versions_of_the_adapter_only(tmp_path: Path) -> None:
    """As `adapter-hub metrics` of the adapter's live versions: on whichever page it is; never a deleted or a
    purged version, however good its value."""
    hub, (first,) = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")
    values = [0.5] * 300
    values[149] = 0.9  # v151: live, on page 2
    values[250] = 0.99  # v252: deleted
    values[260] = 0.999  # v262: purged
    refs = more_versions(hub, first, values)
    _set_status(hub, [refs[250]], "deleted")
    _set_status(hub, [refs[260]], "purged")
    live = [v.ref for v in hub.versions("t/a0000")]
    assert hub.compare_metrics(live).best == {"accuracy|": "t/a0000:151"}
    client = create_app(hub=hub).test_client()
    marked = []
    for page in (1, 2, 3, 4):
        for row in _rows(client.get(f"/adapters/t/a0000?page={page}").get_data(as_text=True)):
            if "★" in row:
                marked.append(re.search(r'value="([^"]+)"', row)[1])  # type: ignore[index]
    assert marked == ["t/a0000:151"]
    # verifying a purged version says why there is nothing to check, not that its blob is missing
    html = client.post("/verify/t/a0000:262").get_data(as_text=True)
    assert "purged: gc freed the blob" in html and 'class="bad"' not in html and "missing" not in html
    hub.close()


def test_a_task_of_many_adapters_is_listed_a_page_at_a_time(tmp_path: Path) -> None:
    hub, refs = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", adapters=230)
    client = create_app(hub=hub).test_client()
    client.get("/tasks/t")
    with _statements(hub) as seen:
        html = client.get("/tasks/t").get_data(as_text=True)
    assert len(seen) <= 15, len(seen)
    assert html.count('class="adapter"') == 100 and ">t/a0000</a>" in html and ">t/a0100</a>" not in html
    assert "1–100 of 230 adapters" in html
    third = client.get("/tasks/t?page=3").get_data(as_text=True)
    assert third.count('class="adapter"') == 30 and ">t/a0229</a>" in third and "201–230 of 230" in third
    narrowed = client.get("/tasks/t?q=a01&page=1").get_data(as_text=True)  # a0100..a0199
    assert narrowed.count('class="adapter"') == 100 and "1–100 of 100" not in narrowed  # one page: no pager
    assert client.get("/tasks/t?page=4").status_code == 404
    assert len(refs) == 230
    hub.close()


def _cell(html: str, adapter: str) -> str:
    row = html.split(f">{adapter}</a>")[1].split("</tr>")[0]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row.split("</td>")[4]))


def test_the_overview_best_is_the_compare_rule_one_split_at_a_time(tmp_path: Path) -> None:
    """Each split is its own row of `adapter-hub metrics`: a version's train value logged after its val value
    does not replace it; equal values go to the version `adapter-hub metrics` marks; deleted versions compete
    for nothing."""
    hub, refs = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", adapters=3)
    a, b, c = refs
    hub.log_metric(a, "accuracy", 0.9, split="val", step=10)
    hub.log_metric(a, "accuracy", 0.1, split="train", step=20)
    more_versions(hub, a, [0.5], split="val")  # a0000:2
    for value in (0.7, 0.7, 0.7):  # three versions tie
        more_versions(hub, b, [value])
    gone = more_versions(hub, c, [0.99, 0.3])[0]
    hub.log_metric(c, "accuracy", 0.2)
    hub.delete(gone)
    groups = overview.overview(hub)
    for item in groups[0].adapters:
        path = f"t/{item.summary.name}"
        table = hub.compare_metrics([v.ref for v in hub.versions(path)], ["accuracy"])
        expected = {split: (table.value(table.best[table.key(name, split)], name, split),
                            int(table.best[table.key(name, split)].rsplit(":", 1)[1]))
                    for name, split in table.rows}  # fmt: skip
        assert {b.split: (b.value, b.number) for b in item.best} == expected, path
    html = create_app(hub=hub).test_client().get("/").get_data(as_text=True)
    assert _cell(html, "t/a0000").split() == ["0.1", "(v1,", "train)", "0.9", "(v1,", "val)"]
    assert _cell(html, "t/a0001").split() == ["0.7", "(v2)"]
    assert _cell(html, "t/a0002").split() == ["0.3", "(v3)"]
    hub.close()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_task_created_while_the_overview_reads_is_no_error(db: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from adapter_hub.registry import queries

    url = f"sqlite:///{tmp_path / 'hub.db'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    hub, _refs = _registry(tmp_path, url)
    summaries = queries.adapter_summaries
    written = []

    def another_client_writes_first(*args: Any, **kwargs: Any) -> Any:
        if not written:  # the CLI adds a task and an adapter between the overview's reads
            written.append(True)  # (add_adapter reads summaries too)
            with Hub.open(tmp_path, url) as other:
                other.add_task("zz-new")
                other.add_adapter("zz-new", "a")
        return summaries(*args, **kwargs)

    monkeypatch.setattr(queries, "adapter_summaries", another_client_writes_first)
    client = create_app(hub=hub).test_client()
    page = client.get("/")
    assert written and page.status_code == 200, re.findall(r'id="message">(.*?)<', page.get_data(as_text=True))
    assert ">t/a0000</a>" in page.get_data(as_text=True)
    assert 'id="task-zz-new"' in client.get("/").get_data(as_text=True)  # the next read sees it
    hub.close()


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"])
def test_a_loopback_server_answers_loopback_host_names(host: str, tmp_path: Path) -> None:
    hub, _refs = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")
    page = create_app(hub=hub).test_client().get("/", headers={"Host": host})
    assert page.status_code == 200 and 'id="task-t"' in page.get_data(as_text=True)
    hub.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example:8000",
                                  "localhost.evil.example"])  # fmt: skip
def test_a_loopback_server_refuses_other_host_names(host: str, tmp_path: Path) -> None:
    """A page of another site whose DNS name now points at 127.0.0.1 (DNS rebinding) reads nothing."""
    hub, _refs = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")
    app = create_app(hub=hub)
    for url in ("/", "/adapters/t/a0000", "/versions/t/a0000:1", "/assets/plotly.min.js"):
        page = app.test_client().get(url, headers={"Host": host})
        assert page.status_code == 400 and "a0000" not in page.get_data(as_text=True), url
    assert app.test_client().post("/verify/t/a0000:1", headers={"Host": host}).status_code == 400
    # bound to another address (--host 0.0.0.0), any name reaches it, as before
    wide = create_app(hub=hub, hosts=trusted_hosts("0.0.0.0")).test_client().get("/", headers={"Host": host})
    assert wide.status_code == 200 and "a0000" in wide.get_data(as_text=True)
    hub.close()


def test_the_host_names_a_server_answers_follow_its_address() -> None:
    loopback = ["localhost", "127.0.0.1", "[::1]"]
    assert trusted_hosts("127.0.0.1") == loopback and trusted_hosts("localhost") == loopback
    assert trusted_hosts("::1") == loopback and trusted_hosts("127.0.0.2") == [*loopback, "127.0.0.2"]
    assert trusted_hosts("0.0.0.0") is None and trusted_hosts("192.168.1.5") is None
    assert trusted_hosts("::") is None and trusted_hosts("myhost.lan") is None


def _chain(hub: Hub, refs: list[str]) -> None:
    """Each of REFS fine-tuned from the one before."""
    from sqlalchemy import insert, select

    from adapter_hub.registry.models import EdgeRow

    numbers = [int(r.rsplit(":", 1)[1]) for r in refs]
    with hub._session(write=True) as s:
        numbered = select(VersionRow.number, VersionRow.id).where(VersionRow.number.in_(numbers))
        ids = {n: i for n, i in s.execute(numbered)}
        s.execute(insert(EdgeRow), [{"child_id": ids[c], "parent_id": ids[p], "relation": "finetuned_from"}
                                    for p, c in zip(numbers, numbers[1:])])  # fmt: skip


def test_a_version_deep_in_a_long_chain_reads_only_its_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter_hub.ui import pages

    monkeypatch.setattr(pages, "MAX_LINEAGE", 20)
    hub, (first,) = _registry(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")
    _chain(hub, [first, *more_versions(hub, first, [None] * 499)])  # v1 → v2 → … → v500
    client = create_app(hub=hub).test_client()
    client.get("/versions/t/a0000:250")
    with _statements(hub) as seen:
        html = client.get("/versions/t/a0000:250").get_data(as_text=True)
    assert len(seen) <= 25, len(seen)
    lineage = html.split("<h2>Lineage</h2>")[1].split("</table>")[0]
    assert re.findall(r'href="/versions/(t/a0000:\d+)"', lineage) == ["t/a0000:249", "t/a0000:251"]
    # the lineage page: the 20 nearest (10 up, 9 down and the version), and a note saying how many more there are
    page = client.get("/lineage/t/a0000:250").get_data(as_text=True)
    edges = page.split('id="edges"')[1]
    shown = set(re.findall(r'href="/versions/t/a0000:(\d+)"', edges))
    assert shown == {str(n) for n in range(240, 260)}, sorted(shown, key=int)
    assert "480 more ancestors and descendants are not shown" in page and "the 20 nearest to t/a0000:250" in page
    small = client.get("/lineage/t/a0000:1").get_data(as_text=True)  # from an end of the chain: 20 descendants
    shown = set(re.findall(r'href="/versions/t/a0000:(\d+)"', small.split('id="edges"')[1]))
    assert shown == {str(n) for n in range(1, 21)} and "480 more" in small
    hub.close()
