"""The web view's HTTP layer through Flask's test client: every page answers with the registry's content, stored
markup is escaped, unknown refs are 404 pages, a missing or outdated database is one message page, nothing is
written, and `adapter-hub ui` serves and stops without importing the web framework before it runs."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import TESTS
from ui_registry import HOSTILE_METRIC, HOSTILE_TAG, XSS

pytest.importorskip("flask", reason="the web view needs the ui extra")
pytest.importorskip("plotly", reason="the web view needs the ui extra")

from adapter_hub.registry import Hub  # noqa: E402
from adapter_hub.ui import create_app  # noqa: E402

Demo = tuple[Path, dict[str, Any]]  # the registry's home and the refs ui_registry.fill returns


def _url(home: Path) -> str:
    return f"sqlite:///{home / 'hub.db'}"


@pytest.fixture(scope="module")
def client(demo_home: Demo) -> Any:
    home, _refs = demo_home
    app = create_app(home, _url(home))
    yield app.test_client()
    app.config["REGISTRY"].close()


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_tasks_page_lists_every_task_with_its_adapters(client: Any) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for task in ("digits-rotated", "digits-inverted", "digits-noisy", "digits-rotated-noisy", "digits-multitask"):
        assert f'id="task-{task}"' in html
    text = _text(html)
    # latest version, aliases (alias→number) and the best val/accuracy (v2's curve ends at 0.85 + 0.05)
    assert "digits-rotated/lora-r4:2" in text and "demo→2" in text and "production→1" in text
    rotated = html.split('id="task-digits-rotated"')[1].split("</section>")[0]
    assert "0.9 <span" in rotated and "(v2)" in rotated
    assert "digits-resnet_small" in text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")


@pytest.mark.parametrize(
    ("query", "shown", "hidden"),
    [
        ("q=probe", ["digits-rotated/probe", "digits-noisy/probe"], ["digits-rotated/lora-r4<"]),
        ("q=MULTI", ["digits-multitask/ties-r12"], ["digits-rotated/probe"]),
        ("tag=recipe%3Dlora-noisy", ["digits-noisy/lora-r4"], ["digits-rotated/lora-r4", "probe"]),
        ("tag=owner", ["digits-rotated/lora-r4", "digits-rotated-noisy/lora-r4-from-rotated"], ["probe"]),
        ("backbone=digits-resnet_small", ["digits-rotated/probe"], []),
        ("backbone=nothing-like-it", [], ["digits-rotated/probe"]),
    ],
)
def test_the_tasks_page_filters_by_name_tag_and_backbone(client: Any, query: str, shown: list[str],
                                                         hidden: list[str]) -> None:  # fmt: skip
    html = client.get(f"/?{query}").get_data(as_text=True)
    for adapter in shown:
        assert f">{adapter}</a>" in html, adapter
    for adapter in hidden:
        assert f">{adapter}" not in html, adapter
    if not shown:
        assert "Nothing matches these filters." in html


def test_the_overview_shows_a_few_adapters_a_task_and_links_to_the_rest(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter_hub.ui import pages

    monkeypatch.setattr(pages, "PER_TASK", 1)
    rotated = client.get("/").get_data(as_text=True).split('id="task-digits-rotated"')[1].split("</section>")[0]
    assert ">digits-rotated/lora-r4</a>" in rotated and ">digits-rotated/probe</a>" not in rotated
    assert '<a href="/tasks/digits-rotated">1 more adapters of digits-rotated →</a>' in rotated
    narrowed = client.get("/?q=digits-rotated").get_data(as_text=True)  # both adapters' task matches
    link = '<a href="/tasks/digits-rotated?q=digits-rotated&amp;tag=&amp;backbone=">1 more adapters of digits-rotated'
    assert link + " that match →</a>" in narrowed
    assert client.get("/tasks/digits-rotated?q=digits-rotated").get_data(as_text=True).count('class="adapter"') == 2
    task_page = client.get("/tasks/digits-rotated").get_data(as_text=True)
    assert ">digits-rotated/lora-r4</a>" in task_page and ">digits-rotated/probe</a>" in task_page


def test_a_filter_with_a_nul_character_is_refused_in_one_line(client: Any) -> None:
    page = client.get("/?tag=owner%00x")
    assert page.status_code == 400 and "a filter cannot contain a NUL character" in page.get_data(as_text=True)


def test_the_versions_page_shows_each_version_with_metrics_status_and_links(client: Any) -> None:
    html = client.get("/adapters/digits-noisy/lora-r4").get_data(as_text=True)
    rows = html.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]
    assert len(rows) == 3  # the deleted version is listed too, newest first
    assert ">deleted</span>" in rows[0] and ">live</span>" in rows[2]
    assert 'href="/versions/digits-noisy/lora-r4:1"' in rows[1]  # v2's parent
    assert 'href="/versions/digits-multitask/ties-r12:1"' in rows[1]  # v2's child (the combination)
    assert "finetuned_from" in rows[1] and "composed_from" in rows[1]
    assert re.search(r'class="num best">0\.25 ★', rows[1])  # train/loss: lower is better
    assert "owner=vision" in _text(rows[2])


def test_the_version_page_shows_config_backbone_artifact_and_recipe(client: Any, demo_home: Demo) -> None:
    home, refs = demo_home
    with Hub.open(home, _url(home)) as hub:
        v = hub.resolve(refs["merged"])
        backbone = hub.backbone(v.backbone)
    html = client.get(f"/versions/{refs['merged']}").get_data(as_text=True)
    text = _text(html)
    assert f"sha256:{v.digest}" in text and backbone.fingerprint in text and "resnet_small" in text
    assert f"{v.trainable_params:,}" in text
    assert f"rank {v.config['r']}" in text and f"alpha {v.config['alpha']}" in text and "targets 0, 4" in text
    recipe = html.split('id="recipe"')[1].split("</table>")[0]
    for domain in ("rotated", "inverted", "noisy"):
        assert f"digits-{domain}/lora-r4:2" in recipe
    assert recipe.count("ties") == 3 and "density=0.5" in recipe
    # aliases by name and `latest` resolve to the same page
    assert f"<h1>{refs['merged']}" in client.get("/versions/digits-multitask/ties-r12@demo").get_data(as_text=True)


def test_verify_reads_the_blob_and_reports_a_corrupt_one(client: Any, demo_home: Demo,
                                                         tmp_path: Path) -> None:  # fmt: skip
    home, refs = demo_home
    ok = client.post(f"/verify/{refs['rotated']}")
    assert ok.status_code == 200 and "the artifact matches its sha256 digest" in ok.get_data(as_text=True)
    # a copy of the registry whose blob of the transfer is damaged
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    with Hub.open(copy, _url(copy)) as hub:
        v = hub.resolve(refs["transfer"])
        blob = hub.store.path(v.digest)
    blob.chmod(0o644)
    blob.write_bytes(b"not the adapter")
    app = create_app(copy, _url(copy))
    html = app.test_client().post(f"/verify/{refs['transfer']}").get_data(as_text=True)
    app.config["REGISTRY"].close()
    assert 'class="bad"' in html and v.digest[:12] in html
    assert hashlib.sha256(blob.read_bytes()).hexdigest() != v.digest  # verify did not "repair" anything


def test_the_lineage_page_draws_a_clickable_graph_with_labelled_edges(client: Any, demo_home: Demo) -> None:
    pytest.importorskip("shutil").which("dot") or pytest.skip("Graphviz's dot is not installed")
    _home, refs = demo_home
    html = client.get(f"/lineage/{refs['rotated']}").get_data(as_text=True)
    svg = html.split('<div class="graph" id="graph">')[1].split("</div>")[0]
    for ref in ("digits-rotated/lora-r4:1", refs["rotated"], refs["transfer"], refs["merged"]):
        assert f'xlink:href="/versions/{ref}"' in svg
    assert "finetuned_from" in svg and "transferred_from" in svg and "composed_from w=0.7 ties" in svg


def test_without_graphviz_the_lineage_page_says_so_and_lists_the_edges(
    client: Any, monkeypatch: pytest.MonkeyPatch, demo_home: Demo
) -> None:
    _home, refs = demo_home
    monkeypatch.setenv("PATH", "/nonexistent")
    html = client.get(f"/lineage/{refs['rotated']}").get_data(as_text=True)
    assert 'id="graph-problem"' in html and "Graphviz" in html and "<svg" not in html
    edges = html.split('id="edges"')[1]
    assert 'href="/versions/digits-rotated-noisy/lora-r4-from-rotated:1"' in edges and "transferred_from" in edges


def test_a_lineage_too_big_to_draw_is_listed(client: Any, monkeypatch: pytest.MonkeyPatch, demo_home: Demo) -> None:
    from adapter_hub.ui import graph

    _home, refs = demo_home
    monkeypatch.setattr(graph, "MAX_DRAWN", 3)
    html = client.get(f"/lineage/{refs['rotated']}").get_data(as_text=True)
    assert "4 versions are too many to draw (at most 3)" in html and "<svg" not in html
    assert html.split('id="edges"')[1].count("<tr>") == 4  # the header and the three edges


def test_compare_marks_the_best_and_sends_a_chart_per_metric(client: Any) -> None:
    refs = ["digits-rotated/lora-r4:1", "digits-rotated/lora-r4:2", "digits-rotated/probe:1"]
    html = client.get("/compare?" + "&".join(f"ref={r}" for r in refs)).get_data(as_text=True)
    table = html.split('id="compare-table"')[1].split("</table>")[0]
    assert table.count('class="num best"') == 3
    assert html.count('class="chart bar"') == 3 and html.count('class="chart steps"') == 1
    assert '<script src="/assets/plotly.min.js"' in html
    # the picker offers every version of the task, the picked ones selected
    assert html.count("selected>") == 3 and 'value="digits-rotated/probe:1" selected' in html
    for name in ("test/accuracy", "train/loss", "val/accuracy"):
        assert f'<input type="checkbox" name="metric" value="{name}">' in html
    # only the metrics asked for, as `adapter-hub metrics --metric`
    only = client.get("/compare?metric=val/accuracy&" + "&".join(f"ref={r}" for r in refs)).get_data(as_text=True)
    table = only.split('id="compare-table"')[1].split("</table>")[0]
    assert table.count("<tr>") == 2 and "val/accuracy" in table and "test/accuracy" not in table
    assert only.count('class="chart bar"') == 1 and only.count('class="chart steps"') == 1
    assert '<input type="checkbox" name="metric" value="val/accuracy" checked>' in only
    js = client.get("/assets/plotly.min.js")
    assert js.status_code == 200 and b"plotly.js" in js.data[:2000] and len(js.data) > 1_000_000
    js.close()


def test_no_page_links_to_another_site(client: Any, demo_home: Demo) -> None:
    _home, refs = demo_home
    for url in ("/", "/adapters/digits-rotated/lora-r4", f"/versions/{refs['merged']}",
                f"/lineage/{refs['rotated']}", f"/compare?ref={refs['rotated']}"):  # fmt: skip
        html = client.get(url).get_data(as_text=True)
        assert not re.search(r'(src|href)=["\']?(https?:)?//', html), url


def test_stored_markup_is_escaped_on_every_page(client: Any, demo_home: Demo) -> None:
    _home, refs = demo_home
    hostile = refs["hostile"]
    pages = ["/", "/tasks/hostile", "/adapters/hostile/x", f"/versions/{hostile}", f"/lineage/{hostile}",
             f"/compare?ref={hostile}", f"/versions/{refs['noisy']}"]  # fmt: skip
    for url in pages:
        html = client.get(url).get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html, url
        assert "<i>m</i>" not in html, url
    version = client.get(f"/versions/{refs['hostile']}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in version
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in version
    # the chart spec escapes the name for plotly (which reads a small HTML subset) and for the attribute
    compare = client.get(f"/compare?ref={refs['hostile']}").get_data(as_text=True)
    assert "val/\\u0026lt;b\\u0026gt;bold" in compare
    assert HOSTILE_METRIC and HOSTILE_TAG and XSS  # the strings the registry holds


def test_a_task_named_like_a_script_renders_as_text(tmp_path: Path) -> None:
    """A database written by another tool (or edited by hand) may hold names the API refuses."""
    from sqlalchemy import insert

    from adapter_hub.registry.models import TaskRow

    home = tmp_path
    with Hub.open(home, _url(home)) as hub, hub._session(write=True) as s:
        s.execute(insert(TaskRow), [{"name": XSS, "metric": XSS, "direction": "max"}])
    app = create_app(home, _url(home))
    client = app.test_client()
    html = client.get("/").get_data(as_text=True)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;</a>" in html
    page = client.get("/tasks/" + urllib.request.quote(XSS, safe=""))
    assert page.status_code == 404 and "<script>" not in page.get_data(as_text=True)
    app.config["REGISTRY"].close()


@pytest.mark.parametrize(
    "url",
    [
        "/versions/digits-rotated/lora-r4:99",
        "/versions/digits-rotated/nope",
        "/versions/nope/lora-r4:1",
        "/versions/digits-rotated/lora-r4@nope",
        "/versions/not-a-ref",
        "/lineage/digits-rotated/lora-r4:0",
        "/adapters/digits-rotated/nope",
        "/tasks/nope",
        "/compare?ref=digits-rotated/lora-r4:7",
        "/versions/%3Cscript%3Ealert(1)%3C/script%3E",
        "/no/such/page",
    ],
)
def test_unknown_refs_are_404_pages_that_name_them(client: Any, url: str) -> None:
    page = client.get(url)
    html = page.get_data(as_text=True)
    assert page.status_code == 404 and 'id="message"' in html
    assert "<script>alert" not in html and "Traceback" not in html


def test_the_view_writes_nothing(demo_home: Demo, client: Any) -> None:
    home, refs = demo_home
    before = {p: p.stat().st_mtime_ns for p in (home / "artifacts").rglob("*") if p.is_file()}
    with Hub.open(home, _url(home)) as hub:
        listed = [v.to_dict() for t in hub.tasks() for a in hub.ls(t.name) for v in hub.versions(f"{t.name}/{a.name}",
                  include_deleted=True)]  # fmt: skip
    for url in ("/", f"/versions/{refs['merged']}", f"/lineage/{refs['merged']}", f"/compare?ref={refs['merged']}"):
        client.get(url)
    client.post(f"/verify/{refs['merged']}")
    assert client.post("/").status_code == 405 and client.delete(f"/versions/{refs['merged']}").status_code == 405
    with Hub.open(home, _url(home)) as hub:
        assert listed == [v.to_dict() for t in hub.tasks() for a in hub.ls(t.name)
                          for v in hub.versions(f"{t.name}/{a.name}", include_deleted=True)]  # fmt: skip
    assert before == {p: p.stat().st_mtime_ns for p in (home / "artifacts").rglob("*") if p.is_file()}


def test_a_missing_database_is_one_message_page_and_is_not_created(tmp_path: Path) -> None:
    app = create_app(tmp_path / "nowhere", None)
    for url in ("/", "/versions/a/b:1", "/compare"):
        page = app.test_client().get(url)
        html = page.get_data(as_text=True)
        assert page.status_code == 503 and "there is no registry database at" in html and "Traceback" not in html
    assert not (tmp_path / "nowhere" / "hub.db").exists()


def test_an_outdated_database_is_one_message_page_naming_the_upgrade(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    with Hub.open(tmp_path, _url(tmp_path)):
        pass
    engine = create_engine(_url(tmp_path))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    engine.dispose()
    page = create_app(tmp_path, _url(tmp_path)).test_client().get("/")
    html = page.get_data(as_text=True)
    assert page.status_code == 503 and "adapter-hub db upgrade" in html and "Traceback" not in html


def test_the_cli_starts_without_the_web_framework(tmp_path: Path) -> None:
    probe = "import sys, adapter_hub.cli; print(sorted(m for m in ('flask', 'werkzeug', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_adapter_hub_ui_serves_the_registry_on_loopback(demo_home: Demo) -> None:
    home, _refs = demo_home
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("ADAPTER_HUB_DB", None)
    proc = subprocess.Popen([sys.executable, "-m", "adapter_hub.cli", "ui", "--home", str(home), "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/", timeout=5) as response:
                    body = response.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert 'id="task-digits-rotated"' in body
        # a page of another site whose DNS name now points here (DNS rebinding) reads nothing
        rebound = urllib.request.Request(f"http://127.0.0.1:{match[1]}/", headers={"Host": f"evil.example:{match[1]}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=10)
        assert refused.value.code == 400 and b"digits-rotated" not in refused.value.read()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_adapter_hub_ui_serves_with_the_store_its_command_line_names(demo_home: Demo, tmp_path: Path) -> None:
    """`--store` reaches the pages, which open the registry in request threads: a store the database does not
    record is the one-line message page, not the registry read from another store."""
    home, _refs = demo_home
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("ADAPTER_HUB_DB", None)
    command = [sys.executable, "-m", "adapter_hub.cli", "--store", str(tmp_path / "elsewhere"), "ui", "--home",
               str(home), "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() if proc.stdout else "" for _ in range(2)]
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", "".join(lines))
        assert match and "not in " in lines[0], lines
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/", timeout=10)
        body = caught.value.read().decode()
        assert caught.value.code == 503 and "keeps its artifacts in each machine" in body, body
        assert 'id="task-digits-rotated"' not in body
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not (tmp_path / "elsewhere").exists()


def test_adapter_hub_ui_refuses_a_port_in_use_in_one_line(tmp_path: Path) -> None:
    import socket

    from helpers import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(tmp_path, "ui", "--port", str(port))
    assert done.returncode == 1 and done.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_adapter_hub_ui_refuses_a_malformed_database_url_in_one_line(tmp_path: Path) -> None:
    from helpers import run_cli

    done = run_cli(tmp_path, "ui", "--db", "::not a url::")
    assert done.returncode == 1 and done.stderr.startswith("Error: not a database URL: '::not a url::'")
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


@pytest.mark.postgres
def test_the_pages_read_the_same_on_postgresql(client: Any, demo_home: Demo, pg_url: str, tmp_path: Path) -> None:
    from ui_registry import fill

    _home, refs = demo_home
    with Hub.open(tmp_path, pg_url) as hub:
        assert fill(hub) == refs
    app = create_app(tmp_path, pg_url)
    compared = "&".join(f"ref=digits-rotated/{v}" for v in ("lora-r4:1", "lora-r4:2", "probe:1"))
    pages = ["/", "/?tag=owner", "/?q=probe&backbone=digits-resnet_small", "/adapters/digits-noisy/lora-r4",
             f"/versions/{refs['merged']}", f"/lineage/{refs['rotated']}", "/versions/digits-rotated/nope",
             f"/compare?{compared}"]  # fmt: skip
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d")  # each registry's own creation times
    for url in pages:
        here, there = client.get(url), app.test_client().get(url)
        assert here.status_code == there.status_code, url
        assert stamp.sub("T", here.get_data(as_text=True)) == stamp.sub("T", there.get_data(as_text=True)), url
    app.config["REGISTRY"].close()


def test_a_registry_that_stops_answering_is_a_503_page(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapter_hub.registry import DatabaseUnreachable

    hub = client.application.config["REGISTRY"].hub()

    def lost(*_args: Any, **_kwargs: Any) -> None:
        raise DatabaseUnreachable("lost the connection to the database postgresql://db/registry; nothing was written")

    monkeypatch.setattr(hub, "_session", lost)  # every read of the registry
    page = client.get("/")
    assert page.status_code == 503 and "lost the connection to the database" in page.get_data(as_text=True)


def test_the_benchmark_times_every_page(tmp_path: Path) -> None:
    """benchmarks/registry_bench.py --ui-only on a small registry: each page answers, and is timed."""
    import argparse

    from helpers import benchmark_script

    with benchmark_script("registry_bench") as bench:
        from adapter_hub.lora import LoRAConfig
        from adapter_hub.model import AdapterModel

        model = AdapterModel(bench.resnet18())
        model.add_adapter("lora", LoRAConfig(r=2, alpha=4, targets=["fc"]))
        args = argparse.Namespace(adapters=30, per_adapter=3, repeat=1, ui_only=True)
        result = bench.run(None, tmp_path / "home", args, model)
        text = bench.ui_report([result], args)
    assert set(result) == {"database", "populate s", "pages ms"} and len(result["pages ms"]) == 9
    assert all(0 < ms < 10_000 for ms in result["pages ms"].values())
    assert "| lineage graph (family of 10 adapters) | " in text and "90 versions over 30 adapters" in text
    assert "| an adapter of 1,000 versions (a page of 100) | " in text


def test_every_link_of_every_page_answers(client: Any) -> None:
    """A crawl from the tasks page: each link a page shows leads to a page that answers (no 404, no error)."""
    from html import unescape

    seen, todo = {"/"}, ["/"]
    while todo:
        url = todo.pop()
        page = client.get(url)
        assert page.status_code == 200, (url, page.status_code)
        if page.mimetype != "text/html":
            continue
        for link in re.findall(r'(?:href|src)="(/[^"]*)"', page.get_data(as_text=True)):
            link = unescape(link)
            if link not in seen:
                seen.add(link)
                todo.append(link)
    assert len(seen) > 40  # tasks, adapters, versions, lineages, compares, assets
