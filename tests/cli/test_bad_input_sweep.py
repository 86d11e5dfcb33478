"""Every `adapter-hub` command given malformed input, as a hostile or unlucky user would try: bad refs, bad
numbers, bad paths, hostile files (images, CSV, adapter files, PEFT directories, /dev/zero), bad database
URLs and revisions, and a damaged artifact store.

The promise checked for each case (README, "Reliability"): exactly one line on stderr starting "Error: ",
exit code 1, no traceback, and nothing changed — every row of every table of the registry database and
every file (path and bytes) of the artifact store are the same before and after. Operations on hostile
files must also end within 5 s.

One registry is built for the module (backbone "small", the catalogue's small ViT; task "rot"; rot/base:1
with an alias and a metric; rot/gone:1, deleted) with 40 random 16 px images. The cases run on a copy of
it, compared after each case with the registry as built and copied afresh after any case that changed it,
so a case that wrongly writes cannot change what the next one sees; a case that damages the artifact store
gets a copy of its own. Cases that could hang or allocate without bound (catastrophic regexes, /dev/zero, a
rank of millions) run in a child process forked from this one (torch is already imported, so it starts at
once, where a fresh interpreter takes 10 s to import torch on two busy cores), whose address space may grow
by 1 GiB at most and which is killed after 20 s: a hang or a runaway allocation fails the case instead of
blocking the run or the machine. Every other case is stopped by an alarm after 10 s, with this process's
address space allowed to grow by 2 GiB."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import sqlite3
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

# The catalogue's small ViT (0.8 M parameters, 16 px images): rebuilt by every import, eval, predict and train
# case, and five times as fast to build and fingerprint as the small ResNet.
SOURCE = {"architecture": "vit_small", "num_classes": 10, "seed": 7, "weights": None}
# The CLI's line for an exception that no check turned into a refusal: a bad input must be refused as such.
DEFECT = "a defect in adapter-hub"
BOUNDED_S = 5.0  # an operation on a hostile file, or a demo's refusal, must end within this
HANG_S = 10.0  # a case still running after this has hung (refusals come before any work): it is stopped
GUARD_S = 20.0  # the same for a case that runs in a child process
MEMORY_GROWTH = 2 << 30  # how much this process's address space may grow while the cases run
GUARD_GROWTH = 1 << 30  # and a child's (a fresh Python with torch imported has about 3.5 GiB of it)


# ---------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One command line. ``{data}``, ``{pred}``, ``{files}`` and ``{tmp}`` in its arguments stand for the
    tiny ImageFolder, the predict folder (one folder per task), the folder of prepared hostile files and a
    fresh folder of this case's own."""

    argv: tuple[str, ...]
    store: str = "intact"  # intact | blob-dir | blob-missing | blob-corrupt | blob-devzero (rot/base:1's blob)
    guard: bool = False  # run in a memory-capped child process: may hang or allocate without bound
    bounded: bool = False  # must end within BOUNDED_S
    may_succeed: bool = False  # a value that can be honoured: exit 0 is allowed too (never a traceback)
    watch: tuple[str, ...] = ()  # paths whose files (or absence) must be unchanged afterwards
    needs_non_root: bool = False  # relies on file modes, which root ignores
    report: str | None = None  # a regex: the command reports what it found (verify) in this one line, not "Error: "


CASES: dict[str, Case] = {}


def case(label: str, *argv: str, **options: Any) -> None:
    assert label not in CASES, label
    CASES[label] = Case(tuple(argv), **options)


# The registry: backbone "small", task "rot" (10 classes), rot/base:1 with alias "prod" and a metric, and
# rot/gone:1, deleted.
BAD_REFS = {
    "version-2^66": "rot/base:99999999999999999999",
    "version-2^63": "rot/base:9223372036854775808",
    "version-0": "rot/base:0",
    "version-neg": "rot/base:-1",
    "empty": "",
    "dotdot": "../x",
    "traversal": "rot/../../etc",
    "unicode": "rot/b\u00e4se",
    "nul": "rot/a\x00b",
    "sql": "rot/a'; drop table adapters; --",
    "unknown-task": "nope/base",
    "unknown-adapter": "rot/nope",
    "unknown-version": "rot/base:7",
    "unknown-alias": "rot/base@nope",
}
TRAIN_OK = ("--backbone", "small", "--data", "{data}", "--epochs", "1")
IMPORT_OK = ("--task", "rot", "--adapter", "imp", "--backbone", "small")

# Every bad ref for the commands that parse a ref in their own way (show and the other readers share
# show's); one of each kind for the rest.
MATRIX_REFS = ["version-2^63", "version-neg", "traversal", "unicode", "nul", "sql", "unknown-task", "unknown-version",
               "unknown-alias"]  # fmt: skip
for key, ref in BAD_REFS.items():
    case(f"show[{key}]", "show", ref)
    case(f"versions[{key}]", "versions", ref)
    case(f"train-from[{key}]", "train", "rot/x", *TRAIN_OK, "--from", ref)
    case(f"alias-set[{key}]", "alias", "set", ref, "staging")
for key in MATRIX_REFS:
    ref = BAD_REFS[key]
    case(f"lineage[{key}]", "lineage", ref)
    case(f"metrics[{key}]", "metrics", "rot/base", ref)
    case(f"rm[{key}]", "rm", ref)
    case(f"tag-set[{key}]", "tag", "set", ref, "owner=x")
    case(f"export[{key}]", "export", ref, "{tmp}/out", watch=("{tmp}/out",))
    case(f"eval[{key}]", "eval", ref, "--data", "{data}")
    case(f"predict[{key}]", "predict", ref, "--data", "{pred}")
    case(f"verify[{key}]", "verify", ref)
    case(f"combine[{key}]", "combine", "rot/base", ref, "-o", "rot/x")
    case(f"import-parent[{key}]", "import", "{files}/peft-ok", *IMPORT_OK, "--parent", ref)
# The aliases of combine and its other ref options share its parsing: a few refs each ('' is valid for
# --head and --norms: no head, the backbone's norms).
for key in ("version-2^63", "unicode", "nul", "unknown-adapter", "unknown-alias"):
    ref = BAD_REFS[key]
    case(f"combine-head[{key}]", "combine", "rot/base", "rot/base:1", "-o", "rot/x", "--head", ref)
    case(f"combine-norms[{key}]", "combine", "rot/base", "rot/base:1", "-o", "rot/x", "--norms", ref)
    case(f"compose-stack[{key}]", "compose", "stack", ref, "rot/base", "-o", "rot/x")
    case(f"compose-average[{key}]", "compose", "average", "rot/base", ref, "-o", "rot/x")

BAD_ALIAS_REFS = {
    "unknown-alias": "rot/base@nope", "empty-alias": "rot/base@", "unknown-adapter": "rot/nope@prod",
    "unknown-task": "nope/base@prod", "no-alias": "rot/base", "a-version": "rot/base:1", "nul": "rot/base@pr\x00d",
    "latest": "rot/base@latest", "empty": "", "dotdot": "../x@prod", "sql": "rot/base@'; drop table aliases; --",
}  # fmt: skip
for key, ref in BAD_ALIAS_REFS.items():
    case(f"alias-rm[{key}]", "alias", "rm", ref)

BAD_NAMES = {
    "empty": "", "space": "a b", "dotdot": "..", "traversal": "../x", "slash": "a/b", "nul": "a\x00b",
    "unicode": "b\u00e4se", "sql": "a'; drop table tasks; --", "long": "a" * 201,
}  # fmt: skip
for key, name in BAD_NAMES.items():
    case(f"task-add[{key}]", "task", "add", name)
    case(f"backbone-add[{key}]", "backbone", "add", name, "vit_small", "--num-classes", "10")
    case(f"alias-set-name[{key}]", "alias", "set", "rot/base:1", name)
for key in ("space", "traversal", "nul", "long"):  # the same name checks, reached through other commands
    name = BAD_NAMES[key]
    case(f"train-output[{key}]", "train", f"rot/{name}", *TRAIN_OK)
    case(f"combine-output[{key}]", "combine", "rot/base", "rot/base:1", "-o", f"rot/{name}")
    case(f"import-adapter[{key}]", "import", "{files}/peft-ok", "--task", "rot", "--adapter", name, "--backbone",
         "small")  # fmt: skip
    case(f"ls-task[{key}]", "ls", name)
case("alias-set-name[long-101]", "alias", "set", "rot/base:1", "a" * 101)
case("alias-set-name[latest]", "alias", "set", "rot/base:1", "latest")
case("task-add[duplicate]", "task", "add", "rot", "--num-classes", "3")
case("task-add[domain-nul]", "task", "add", "t2", "--domain", "a\x00b")
case("task-add[metric-long]", "task", "add", "t2", "--metric", "m" * 201)
case("task-add[description-nul]", "task", "add", "t2", "--description", "a\x00b")
case("backbone-add[duplicate-other-weights]", "backbone", "add", "small", "vit_small", "--num-classes", "10",
     "--seed", "8")  # fmt: skip
case("backbone-add[unknown-architecture]", "backbone", "add", "b2", "nosuch_net")
case("backbone-add[architecture-nul]", "backbone", "add", "b2", "vit_small\x00")
case("backbone-add[missing-module]", "backbone", "add", "b2", "nosuch_module_xyz:build")
case("backbone-add[missing-callable]", "backbone", "add", "b2", "json:nosuch_callable")
case("backbone-add[fingerprint-not-hex]", "backbone", "add", "b2", "--fingerprint", "zz")
case("backbone-add[fingerprint-empty]", "backbone", "add", "b2", "--fingerprint", "")
case("backbone-add[fingerprint-nul]", "backbone", "add", "b2", "--fingerprint", "ab\x00cd")
case("ls-task[unknown]", "ls", "nope")
case("versions[no-adapter]", "versions", "rot")
case("versions[three-parts]", "versions", "rot/base/x")
case("rm[already-deleted]", "rm", "rot/gone:1")
case("verify[ref-and-all]", "verify", "rot/base", "--all")
case("predict[two-versions-one-task]", "predict", "rot/base", "rot/base:1", "--data", "{pred}")
case("lineage[png-without-o]", "lineage", "rot/base", "--format", "png")
for key, pair in {"no-key": "=v", "no-equals": "novalue", "key-nul": "k\x00=v", "value-nul": "k=v\x00",
                  "key-long": "k" * 201 + "=v"}.items():  # fmt: skip
    case(f"tag-set-pair[{key}]", "tag", "set", "rot/base:1", pair)
for key, value in {"unknown-task": ("--task", "nope"), "unknown-backbone": ("--backbone", "nope"),
                   "long-key": ("--key", "k" * 65), "nul-key": ("--key", "k\x00")}.items():  # fmt: skip
    args = dict(zip(IMPORT_OK[::2], IMPORT_OK[1::2])) | {value[0]: value[1]}
    case(f"import[{key}]", "import", "{files}/peft-ok", *(x for kv in args.items() for x in kv))
for key, extra in {"unknown-backbone": ("--backbone", "nope"), "targets-match-nothing": ("--targets", "nosuch*"),
                   "unknown-head": ("--head", "nosuch"), "long-key": ("--key", "k" * 65),
                   "norm-layers": ("--norm-layers", "bogus")}.items():  # fmt: skip
    args = dict(zip(TRAIN_OK[::2], TRAIN_OK[1::2])) | {extra[0]: extra[1]}
    case(f"train[{key}]", "train", "rot/x", *(x for kv in args.items() for x in kv))

# ---- numbers
HUGE = "99999999999999999999"
NUMBERS = {"zero": "0", "neg": "-1", "huge": HUGE, "nan": "nan", "inf": "inf"}


def numbers(prefix: str, argv: tuple[str, ...], option: str, skip: tuple[str, ...] = (), **extra: Any) -> None:
    for key, value in NUMBERS.items():
        if key not in skip:
            case(f"{prefix}{option}[{key}]", *argv, option, value, **extra)


for option in ("--rank", "--alpha", "--lr", "--epochs", "--max-length"):
    numbers("train", ("train", "rot/x", *TRAIN_OK), option)
numbers("train", ("train", "rot/x", *TRAIN_OK), "--seed", skip=("zero",))
for method, option in (("ties", "--density"), ("svd", "--rank")):
    numbers(f"combine-{method}", ("combine", "rot/base", "rot/base:1", "-o", "rot/x", "--method", method), option)
numbers("combine-dare", ("combine", "rot/base", "rot/base:1", "-o", "rot/x", "--method", "dare_ties", "--density",
                         "0.5"), "--seed", skip=("zero",))  # fmt: skip
BAD_WEIGHTS = {"nan": "nan,1", "inf": "inf,1", "-inf": "-inf,1", "overflow": "1e400,1", "empty": "", "comma": ",",
               "three": "1,2,3", "words": "a,b"}  # fmt: skip
for key, weights in BAD_WEIGHTS.items():
    case(f"combine--weights[{key}]", "combine", "rot/base", "rot/base:1", "-o", "rot/x", "--weights", weights)
    case(f"compose-stack--weights[{key}]", "compose", "stack", "rot/base", "rot/base:1", "-o", "rot/x", "--weights",
         weights)  # fmt: skip
BACKBONE_ADD = ("backbone", "add", "b2", "vit_small")
numbers("backbone-add", BACKBONE_ADD, "--num-classes")
numbers("backbone-add", (*BACKBONE_ADD, "--num-classes", "10"), "--seed", skip=("zero",))
numbers("backbone-add", (*BACKBONE_ADD, "--num-classes", "10"), "--image-size")
case("backbone-add--image-size[4097]", *BACKBONE_ADD, "--num-classes", "10", "--image-size", "4097")
for key, value in {"nan": "nan", "inf": "inf", "-inf": "-inf", "two": "0.5,0.5", "four": "1,1,1,1", "empty": "",
                   "words": "a"}.items():  # fmt: skip
    case(f"backbone-add--mean[{key}]", *BACKBONE_ADD, "--num-classes", "10", "--mean", value, "--std", "1")
for key, value in {"zero": "0", "neg": "-1", "nan": "nan", "inf": "inf", "two": "1,1", "empty": ""}.items():
    case(f"backbone-add--std[{key}]", *BACKBONE_ADD, "--num-classes", "10", "--mean", "0", "--std", value)
numbers("task-add", ("task", "add", "t2"), "--num-classes")
for key, value in {"empty": "", "blank": " "}.items():
    case(f"task-add--metric[{key}]", "task", "add", "t2", "--metric", value)
# a factory that exits (sys.exit raises SystemExit) must not end the command with exit 0
for key, factory in {"sys-exit": "sys:exit", "quit": "builtins:quit"}.items():
    case(f"backbone-add-factory[{key}]", "backbone", "add", "b2", factory)
# an empty path is a mistake, never "the current folder"
case("export[dest-empty]", "export", "rot/base", "")
case("eval--data[empty-string]", "eval", "rot/base", "--data", "")
case("train--data[empty-string]", "train", "rot/x", "--backbone", "small", "--data", "", "--epochs", "1")
case("predict-o[empty]", "predict", "rot/base", "--data", "{pred}", "-o", "")
case("lineage-o[empty]", "lineage", "rot/base", "--format", "dot", "-o", "")
for option, high in (("--rank", "257"), ("--epochs", "101"), ("--backbone-epochs", "1001")):
    numbers("demo", ("demo", "--quiet"), option, bounded=True)
    case(f"demo{option}[above-max]", "demo", "--quiet", option, high, bounded=True)
numbers("demo", ("demo", "--quiet"), "--seed", skip=("zero",), bounded=True)
case("demo--backbone[unknown]", "demo", "--quiet", "--backbone", "cnn", bounded=True)
numbers("data-digits", ("data", "digits", "{tmp}/digits"), "--seed", skip=("zero",), watch=("{tmp}/digits",))
for key, value in {"neg": "-1", "nan": "nan", "-inf": "-inf"}.items():
    case(f"gc--grace[{key}]", "gc", "--grace", value)
for key, value in {"huge": HUGE, "inf": "inf"}.items():  # keeping every blob is a possible reading of these
    case(f"gc--grace[{key}]", "gc", "--grace", value, may_succeed=True)
    case(f"gc--grace-purge[{key}]", "gc", "--purge-deleted", "--grace", value, may_succeed=True)

# ---- paths
case("export[dest-parent-missing]", "export", "rot/base", "{tmp}/none/sub", watch=("{tmp}/none",))
case("export[dest-is-a-file]", "export", "rot/base", "{files}/plainfile", watch=("{files}/plainfile",))
case("export[dest-under-a-file]", "export", "rot/base", "{files}/plainfile/sub", watch=("{files}/plainfile",))
case("export[dest-not-writable]", "export", "rot/base", "{files}/ro/sub", watch=("{files}/ro",),
     needs_non_root=True)  # fmt: skip
case("export[file-exists]", "export", "rot/base:1", "{files}/exported", watch=("{files}/exported",))
case("export-peft[dest-not-empty]", "export", "rot/base:1", "{files}/peft-ok", "--format", "peft",
     watch=("{files}/peft-ok",))  # fmt: skip
case("export-peft[dest-parent-missing]", "export", "rot/base", "{tmp}/none/sub", "--format", "peft",
     watch=("{tmp}/none",))  # fmt: skip
OUTPUT_COMMANDS = {"predict-o": ("predict", "rot/base", "--data", "{pred}", "-o"),
                   "lineage-o": ("lineage", "rot/base", "--format", "dot", "-o")}  # fmt: skip
for name, command in OUTPUT_COMMANDS.items():
    file = "p.csv" if name == "predict-o" else "l.dot"
    case(f"{name}[parent-missing]", *command, f"{{tmp}}/none/{file}", watch=("{tmp}/none",))
    case(f"{name}[is-a-directory]", *command, "{files}/emptydir", watch=("{files}/emptydir",))
    case(f"{name}[under-a-file]", *command, f"{{files}}/plainfile/{file}", watch=("{files}/plainfile",))
    case(f"{name}[not-writable]", *command, f"{{files}}/ro/{file}", watch=("{files}/ro",), needs_non_root=True)
# /sys refuses new files even to root, though os.access says it may write there
case("export[dest-in-sys]", "export", "rot/base", "/sys/adapter-hub-sweep")
case("predict-o[in-sys]", "predict", "rot/base", "--data", "{pred}", "-o", "/sys/adapter-hub-sweep.csv")
case("lineage-o[in-sys]", "lineage", "rot/base", "--format", "dot", "-o", "/sys/adapter-hub-sweep.dot")
case("data-digits[in-sys]", "data", "digits", "/sys/adapter-hub-sweep")
case("ls--home[in-sys]", "--home", "/sys/adapter-hub-sweep", "ls")
case("demo--home[in-sys]", "--home", "/sys/adapter-hub-sweep", "demo", "--quiet", bounded=True)
BAD_DATA_DIRS = {"missing": "{tmp}/none", "a-file": "{files}/plainfile", "empty": "{files}/emptydir",
                 "no-images": "{files}/noimages", "five-classes": "{files}/fiveclasses"}  # fmt: skip
for key, where in BAD_DATA_DIRS.items():
    case(f"train--data[{key}]", "train", "rot/x", "--backbone", "small", "--data", where, "--epochs", "1")
    case(f"eval--data[{key}]", "eval", "rot/base", "--data", where)
for key, where in {"missing": "{tmp}/none", "empty": "{files}/emptydir", "plain-text": "{files}/plainfile",
                   "unknown-task-folder": "{files}/pred-unknown-task"}.items():  # fmt: skip
    case(f"predict--data[{key}]", "predict", "rot/base", "--data", where)
case("import[source-missing]", "import", "{tmp}/none", *IMPORT_OK)
case("import[empty-dir]", "import", "{files}/emptydir", *IMPORT_OK)
case("import[file-as-peft]", "import", "{files}/adapter-ok.safetensors", *IMPORT_OK, "--format", "peft")
case("import[dir-as-safetensors]", "import", "{files}/peft-ok", *IMPORT_OK, "--format", "safetensors")
for key, where in {"missing": "{tmp}/none", "a-dir": "{files}/emptydir", "garbage": "{files}/garbage.bin",
                   "other-state-dict": "{files}/adapter-ok.safetensors"}.items():  # fmt: skip
    case(f"backbone-add--weights[{key}]", *BACKBONE_ADD, "--num-classes", "10", "--weights", where)
for key, where in {"missing": "{tmp}/none", "empty": "{files}/emptydir", "a-file": "{files}/plainfile"}.items():
    case(f"backbone-add--hf[{key}]", "backbone", "add", "b2", "--hf", where)
case("data-digits[dir-is-a-file]", "data", "digits", "{files}/plainfile", watch=("{files}/plainfile",))
case("data-digits[dir-under-a-file]", "data", "digits", "{files}/plainfile/sub", watch=("{files}/plainfile",))
case("data-digits[not-writable]", "data", "digits", "{files}/ro/sub", watch=("{files}/ro",), needs_non_root=True)
for command in (("ls",), ("demo", "--quiet")):
    name = command[0]
    bounded = name == "demo"
    case(f"{name}--home[a-file]", "--home", "{files}/plainfile", *command, bounded=bounded,
         watch=("{files}/plainfile",))  # fmt: skip
    case(f"{name}--home[under-a-file]", "--home", "{files}/plainfile/sub", *command, bounded=bounded,
         watch=("{files}/plainfile",))  # fmt: skip
    case(f"{name}--home[not-writable]", "--home", "{files}/ro/home", *command, bounded=bounded,
         watch=("{files}/ro",), needs_non_root=True)  # fmt: skip

# ---- hostile images (each in train/00 and test/00 of a copy of the data, and in the predict folder)
IMAGES = ("corrupt", "truncated", "empty", "other-size", "bomb")
for kind in IMAGES:
    case(f"train-image[{kind}]", "train", "rot/x", "--backbone", "small", "--data", f"{{files}}/img-{kind}",
         "--epochs", "1", bounded=True)  # fmt: skip
    case(f"eval-image[{kind}]", "eval", "rot/base", "--data", f"{{files}}/img-{kind}", bounded=True)
    case(f"predict-image[{kind}]", "predict", "rot/base", "--data", f"{{files}}/pred-{kind}", bounded=True)
# a named pipe among the images: opening it would wait for a writer for ever
case("train-image[fifo]", "train", "rot/x", "--backbone", "small", "--data", "{files}/img-fifo", "--epochs", "1",
     bounded=True, guard=True)  # fmt: skip
case("eval-image[fifo]", "eval", "rot/base", "--data", "{files}/img-fifo", bounded=True, guard=True)
case("predict-image[fifo]", "predict", "rot/base", "--data", "{files}/pred-fifo", bounded=True, guard=True)
case("predict-csv-image[fifo]", "predict", "rot/base", "--data", "{files}/csv-fifo.csv", bounded=True, guard=True)
for kind in ("other-size", "bomb"):  # the same reader as a folder's images; a CSV mixes sizes its own way
    case(f"predict-csv-image[{kind}]", "predict", "rot/base", "--data", f"{{files}}/csv-{kind}.csv", bounded=True)

# ---- hostile CSV
CSVS = ("binary", "latin1", "nul", "huge-field", "header-only", "no-columns", "label-99", "label-word",
        "label-neg", "label-superscript", "missing-image", "escaping-path", "unknown-task", "zero-bytes")  # fmt: skip
for kind in CSVS:
    case(f"predict-csv[{kind}]", "predict", "rot/base", "--data", f"{{files}}/bad-{kind}.csv", bounded=True)
for kind in ("binary", "latin1"):
    case(f"train-csv[{kind}]", "train", "rot/x", "--backbone", "small", "--data", f"{{files}}/bad-{kind}.csv",
         "--epochs", "1", bounded=True)  # fmt: skip
    case(f"eval-csv[{kind}]", "eval", "rot/base", "--data", f"{{files}}/bad-{kind}.csv", bounded=True)

# ---- hostile adapter files (metadata edits of rot/base:1's own file, so the fingerprint matches)
NESTED = "[" * 100000 + "]" * 100000
LAYER = "encoder.layers.encoder_layer_3.mlp.0"  # a Linear the registered adapter adapts
HEAD = "heads.head"


def _layers(**change: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(layers: dict[str, Any]) -> Any:
        layers[LAYER] = {k: v for k, v in {**layers[LAYER], **change}.items() if v is not _DROP}
        return layers

    return edit


def _config(**change: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda config: {**config, **change}


_DROP = object()
# metadata key -> replacement text, or a function of the parsed value giving the new value
ADAPTER_EDITS: dict[str, tuple[str, Any]] = {
    "config-list": ("adapter_hub.config", "[1, 2]"),
    "config-nested": ("adapter_hub.config", NESTED),
    "config-alpha-word": ("adapter_hub.config", _config(alpha="sixteen")),
    "config-alpha-nan": ("adapter_hub.config", _config(alpha=float("nan"))),
    "config-alpha-inf": ("adapter_hub.config", _config(alpha=float("inf"))),
    "format-version-word": ("adapter_hub.format_version", "abc"),
    "format-version-huge": ("adapter_hub.format_version", "9" * 5000),
    "format-version-neg": ("adapter_hub.format_version", "-1"),
    "layers-nested": ("adapter_hub.layers", NESTED),
    "layer-without-r": ("adapter_hub.layers", _layers(r=_DROP)),
    "layer-r-word": ("adapter_hub.layers", _layers(r="8")),
    "layer-alpha-nan": ("adapter_hub.layers", _layers(alpha=float("nan"))),
    "layer-unknown-module": ("adapter_hub.layers", lambda d: {**d, "nosuch.conv": d[LAYER]}),
    "heads-mapping": ("adapter_hub.heads", json.dumps({HEAD: 1})),
    "heads-empty-path": ("adapter_hub.heads", json.dumps([HEAD, ""])),
    "norms-numbers": ("adapter_hub.norms", "[1, 2]"),
    "metadata-nested": ("adapter_hub.metadata", NESTED),
    "fingerprint-other": ("adapter_hub.backbone_fingerprint", "0" * 64),
    "layer-alpha-zero": ("adapter_hub.layers", _layers(alpha=0.0)),
    "config-alpha-zero": ("adapter_hub.config", _config(alpha=0)),
    "config-target-empty": ("adapter_hub.config", _config(targets=[""])),
}
GUARDED_ADAPTER_EDITS = {
    "layer-r-4194304": ("adapter_hub.layers", _layers(r=4194304, rank=4194304)),
    # a Linear has no use for "rank": the claim that allocates is r's
    "layer-r-4194304-rank-2": ("adapter_hub.layers", _layers(r=4194304, rank=2)),
}
RAW_ADAPTER_FILES = ("zero-bytes", "random-bytes", "truncated", "header-2^63", "header-nested", "tensor-misshaped")
for key in (*ADAPTER_EDITS, *RAW_ADAPTER_FILES):
    case(f"import-file[{key}]", "import", f"{{files}}/adapter-{key}.safetensors", *IMPORT_OK, bounded=True)
for key in GUARDED_ADAPTER_EDITS:
    case(f"import-file[{key}]", "import", f"{{files}}/adapter-{key}.safetensors", *IMPORT_OK, bounded=True,
         guard=True)  # fmt: skip
case("import-file[dev-zero]", "import", "/dev/zero", *IMPORT_OK, bounded=True, guard=True)
case("import-file[symlink-to-dev-zero]", "import", "{files}/devzero.safetensors", *IMPORT_OK, bounded=True, guard=True)
case("backbone-add--weights[dev-zero]", *BACKBONE_ADD, "--num-classes", "10", "--weights", "/dev/zero", bounded=True,
     guard=True)  # fmt: skip
for command, argv in {"train": ("train", "rot/x", "--backbone", "small", "--epochs", "1"),
                      "eval": ("eval", "rot/base"), "predict": ("predict", "rot/base")}.items():  # fmt: skip
    case(f"{command}--data[dev-zero]", *argv, "--data", "/dev/zero", bounded=True, guard=True)

# ---- hostile PEFT directories (edits of rot/base:1 exported as PEFT)
CATASTROPHIC = "(((.*)*)*)*!"
PEFT_EDITS: dict[str, Any] = {
    "config-list": "[1, 2]",
    "config-nested": NESTED,
    "config-not-utf8": b'{"r": "\xe9"}',
    "lora-alpha-nan": {"lora_alpha": float("nan")},
    "lora-alpha-word": {"lora_alpha": "sixteen"},
    "r-string": {"r": "8"},
    "r-zero": {"r": 0},
    "alpha-pattern-word": {"alpha_pattern": {LAYER: "sixteen"}},
    "rank-pattern-word": {"rank_pattern": {LAYER: "two"}},
    "rank-pattern-invalid-regex": {"rank_pattern": {"(": 2}},
    "peft-type-other": {"peft_type": "PREFIX_TUNING"},
    "target-modules-number": {"target_modules": 42},
    "lora-alpha-zero": {"lora_alpha": 0},
}
GUARDED_PEFT_EDITS: dict[str, Any] = {
    "rank-pattern-catastrophic": {"rank_pattern": {CATASTROPHIC: 2}},
    "alpha-pattern-catastrophic": {"alpha_pattern": {CATASTROPHIC: 16}},
    "r-4194304": {"r": 4194304},
    "rank-pattern-4194304": {"rank_pattern": {LAYER: 4194304}},
}
PEFT_LAYOUTS = ("config-is-a-dir", "weights-missing", "weights-garbage")
for key in (*PEFT_EDITS, *PEFT_LAYOUTS):
    case(f"import-peft[{key}]", "import", f"{{files}}/peft-{key}", *IMPORT_OK, bounded=True)
for key in GUARDED_PEFT_EDITS:  # a catastrophic regex may also be run, if it ends within BOUNDED_S
    case(f"import-peft[{key}]", "import", f"{{files}}/peft-{key}", *IMPORT_OK, bounded=True, guard=True,
         may_succeed="catastrophic" in key)  # fmt: skip
case("import-peft[weights-dev-zero]", "import", "{files}/peft-weights-dev-zero", *IMPORT_OK, bounded=True,
     guard=True)  # fmt: skip
for key, name in {"traversal": "../../etc", "dotdot": "..", "absolute": "/etc", "nul": "a\x00b"}.items():
    case(f"import-peft-name[{key}]", "import", "{files}/peft-ok", *IMPORT_OK, "--peft-name", name)

# ---- database
DB_COMMANDS = {"ls": ("ls",), "backbone-ls": ("backbone", "ls"), "task-ls": ("task", "ls"),
               "show": ("show", "rot/base"), "db-current": ("db", "current"), "db-upgrade": ("db", "upgrade"),
               "gc": ("gc",), "verify": ("verify",)}  # fmt: skip
for name, command in DB_COMMANDS.items():
    case(f"{name}--db[mysql]", "--db", "mysql://u@h/x", *command)
for name in ("ls", "db-current", "db-upgrade", "gc"):
    case(f"{name}--db[not-a-url]", "--db", "::not a url::", *DB_COMMANDS[name])
    case(f"{name}--db[folder-missing]", "--db", "sqlite:///{tmp}/none/hub.db", *DB_COMMANDS[name],
         watch=("{tmp}/none",))  # fmt: skip
    case(f"{name}--db[not-a-database]", "--db", "sqlite:///{files}/garbage.bin", *DB_COMMANDS[name],
         watch=("{files}/garbage.bin",))  # fmt: skip
for key, revision in {"unknown": "nosuchrev", "range": "0002:0001", "range-from-head": "0003:0001",
                      "sql": "'; drop table adapters; --", "downgrade-0001": "0001", "downgrade-0002": "0002",
                      "downgrade-base": "base", "relative-down": "-1", "relative-up": "+1",
                      "empty": ""}.items():  # fmt: skip
    case(f"db-upgrade[{key}]", "db", "upgrade", "--", revision)

# ---- artifact store: rot/base:1's blob replaced by a folder, removed, or changed
STORE_COMMANDS = {
    "export": ("export", "rot/base:1", "{tmp}/out"),
    "export-peft": ("export", "rot/base:1", "{tmp}/out", "--format", "peft"),
    "eval": ("eval", "rot/base:1", "--data", "{data}"),
    "predict": ("predict", "rot/base:1", "--data", "{pred}"),
    "train-from": ("train", "rot/x", *TRAIN_OK, "--from", "rot/base:1"),
    "combine": ("combine", "rot/base:1", "rot/base:1", "-o", "rot/x"),
    "compose-stack": ("compose", "stack", "rot/base:1", "rot/base:1", "-o", "rot/x"),
    "verify": ("verify",),
    "verify-ref": ("verify", "rot/base:1"),
}
# verify's finding is its report, one line per damaged version: "REF: missing blob …" / "REF: corrupt blob …"
VERIFY_REPORT = r"^rot/base:1: (missing|corrupt) blob\b"
for store in ("blob-dir", "blob-missing", "blob-corrupt"):
    for name, command in STORE_COMMANDS.items():
        case(f"{name}[{store}]", *command, store=store, watch=("{tmp}/out",),
             report=VERIFY_REPORT if name.startswith("verify") else None)  # fmt: skip
for name in ("verify-ref", "export"):
    case(f"{name}[blob-devzero]", *STORE_COMMANDS[name], store="blob-devzero", guard=True, bounded=True,
         report=VERIFY_REPORT if name.startswith("verify") else None)  # fmt: skip


# ----------------------------------------------------------------------------------------- the registry


def _png(size: int, rng: random.Random) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (past PIL's Image.MAX_IMAGE_PIXELS): the bomb is
    in the header alone, so reading it must be refused before any decoding."""
    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))  # fmt: skip


def _imagefolder(root: Path, rng: random.Random) -> None:
    """train/ (2 images a class), val/ and test/ (1 a class): 40 random 16 x 16 PNGs."""
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        for label in range(10):
            folder = root / split / f"{label:02d}"
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(_png(16, rng))


def _hostile_image(kind: str, valid: bytes, rng: random.Random) -> bytes:
    return {
        "corrupt": rng.randbytes(300),
        "truncated": valid[: len(valid) // 2],
        "empty": b"",
        "other-size": _png(32, rng),
        "bomb": _bomb_png(),
    }[kind]


def _write_csvs(files: Path, pred: Path) -> None:
    first = sorted((pred / "rot").rglob("*.png"))[0]
    good = f"{first},rot,0\n"
    texts: dict[str, bytes] = {
        "binary": bytes(range(256)) * 4,
        "latin1": "path,task,label\n\u00e9t\u00e9.png,rot,0\n".encode("latin-1"),
        "nul": f"path,task,label\n{first}\x00,rot,0\n".encode(),
        "huge-field": ("path,task,label\n" + "a" * 200_000 + ",rot,0\n").encode(),
        "header-only": b"path,task,label\n",
        "no-columns": b"a,b\n1,2\n",
        "label-99": f"path,task,label\n{first},rot,99\n".encode(),
        "label-word": f"path,task,label\n{first},rot,seven\n".encode(),
        "label-neg": f"path,task,label\n{first},rot,-1\n".encode(),
        "label-superscript": f"path,task,label\n{first},rot,\u00b2\n".encode(),
        "missing-image": f"path,task,label\n{files}/none.png,rot,0\n{good}".encode(),
        "escaping-path": f"path,task,label\n../../../../../../../../etc/passwd,rot,0\n{good}".encode(),
        "unknown-task": f"path,task,label\n{first},nope,0\n".encode(),
        "zero-bytes": b"",
    }
    for kind, text in texts.items():
        (files / f"bad-{kind}.csv").write_bytes(text)


def _edited_adapter(blob: bytes, key: str, change: Any) -> bytes:
    from adapter_hub.formats import adapter_file

    tensors, meta = adapter_file.read_tensors(blob, "blob")
    meta = dict(meta)
    meta[key] = change if isinstance(change, str) else json.dumps(change(json.loads(meta[key])))
    return adapter_file.canonical_safetensors(tensors, meta)


def _raw_header(blob: bytes, header: Any) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + blob[8 + int.from_bytes(blob[:8], "little") :]


def _raw_adapter(kind: str, blob: bytes, rng: random.Random) -> bytes:
    import torch

    from adapter_hub.formats import adapter_file

    tensors, meta = adapter_file.read_tensors(blob, "blob")
    key = f"{LAYER}.lora_A.weight"
    if kind == "zero-bytes":
        return b""
    if kind == "random-bytes":
        return rng.randbytes(4096)
    if kind == "truncated":
        return blob[: len(blob) // 2]
    if kind == "header-2^63":
        return (2**63).to_bytes(8, "little") + blob[8:]
    if kind == "header-nested":
        return _raw_header(blob, NESTED)
    if kind == "tensor-misshaped":
        tensors[key] = torch.zeros(3, *tensors[key].shape[1:])
    return adapter_file.canonical_safetensors(tensors, meta)


def _peft_dir(root: Path, ok: Path, change: Any) -> None:
    shutil.copytree(ok, root)
    config = root / "adapter_config.json"
    if isinstance(change, bytes):
        config.write_bytes(change)
    elif isinstance(change, str):
        config.write_text(change)
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))


@dataclass
class Env:
    home: Path  # the registry as built
    files: Path
    data: Path
    pred: Path
    digest: str  # rot/base:1's artifact
    work: Path  # the copy the cases run on
    scratch: Path  # each case's own folders go in here
    pristine_state: dict[str, Any]

    def reset(self) -> None:
        shutil.rmtree(self.work)
        shutil.copytree(self.home, self.work, symlinks=True)

    def fill(self, text: str, tmp: Path) -> str:
        for token, value in (("{files}", self.files), ("{data}", self.data), ("{pred}", self.pred), ("{tmp}", tmp)):
            text = text.replace(token, str(value))
        return text


def cli() -> Any:
    from adapter_hub.cli import main

    return main


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import torch

    from adapter_hub import AdapterModel, Hub, LoRAConfig, backbones

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sweep")
    home, files, data, pred = root / "home", root / "files", root / "data", root / "pred"
    files.mkdir()
    rng = random.Random(0)
    model = AdapterModel(backbones.build_backbone(SOURCE))
    # norm_layers="all": the adapter owns the LayerNorms, so its file lists norms (adapter_hub.norms)
    model.add_adapter("base", LoRAConfig(r=2, targets=[LAYER, LAYER[:-1] + "3"], heads=[HEAD], norm_layers="all"))
    with Hub.open(home) as hub:
        hub.add_backbone("small", model.backbone, architecture="vit_small", source=SOURCE)
        hub.add_task("rot", num_classes=10)
        version = hub.register(model, "base", task="rot", name="base")
        hub.set_alias(version.ref, "prod")
        hub.log_metric(version.ref, "val/accuracy", 0.5)
        model.add_adapter("gone", LoRAConfig(r=1, targets=[LAYER], heads=[HEAD]))
        gone = hub.register(model, "gone", task="rot", name="gone")
        hub.delete(gone.ref)
    _imagefolder(data, rng)
    shutil.copytree(data / "test", pred / "rot")

    shown = CliRunner().invoke(cli(), ["--home", str(home), "--json", "show", "rot/base:1"])
    assert shown.exit_code == 0, shown.output
    digest = json.loads(shown.stdout)["digest"]
    blob = (home / "artifacts" / "sha256" / digest[:2] / digest[2:]).read_bytes()
    exported = CliRunner().invoke(cli(), ["--home", str(home), "export", "rot/base:1", str(files / "peft-ok"),
                                          "--format", "peft"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    exported = CliRunner().invoke(cli(), ["--home", str(home), "export", "rot/base:1", str(files / "exported")])
    assert exported.exit_code == 0, exported.output

    (files / "plainfile").write_text("hello\n")
    (files / "emptydir").mkdir()
    (files / "garbage.bin").write_bytes(rng.randbytes(4096))
    (files / "adapter-ok.safetensors").write_bytes(blob)
    for label in range(10):
        (files / "noimages" / f"{label:02d}").mkdir(parents=True)
    for label in range(5):
        shutil.copytree(data / "train" / f"{label:02d}", files / "fiveclasses" / f"{label:02d}")
    shutil.copytree(data / "test", files / "pred-unknown-task" / "nope")
    (files / "ro").mkdir()
    (files / "ro").chmod(0o500)

    valid = (data / "train" / "00" / "0.png").read_bytes()
    for kind in IMAGES:
        bad = _hostile_image(kind, valid, rng)
        shutil.copytree(data, files / f"img-{kind}")
        for split in ("train", "test"):
            (files / f"img-{kind}" / split / "00" / "bad.png").write_bytes(bad)
        shutil.copytree(pred, files / f"pred-{kind}")
        (files / f"pred-{kind}" / "rot" / "00" / "bad.png").write_bytes(bad)
        (files / f"bad-{kind}.png").write_bytes(bad)
        good = sorted((pred / "rot").rglob("*.png"))[0]
        (files / f"csv-{kind}.csv").write_text(f"path,task,label\n{good},rot,0\nbad-{kind}.png,rot,0\n")
    shutil.copytree(data, files / "img-fifo")
    shutil.copytree(pred, files / "pred-fifo")
    for fifo in (files / "img-fifo" / "train" / "00" / "bad.png", files / "pred-fifo" / "rot" / "00" / "bad.png",
                 files / "fifo.png"):  # fmt: skip
        os.mkfifo(fifo)
    (files / "csv-fifo.csv").write_text(f"path,task,label\n{good},rot,0\nfifo.png,rot,0\n")
    _write_csvs(files, pred)

    for key, (meta_key, change) in {**ADAPTER_EDITS, **GUARDED_ADAPTER_EDITS}.items():
        (files / f"adapter-{key}.safetensors").write_bytes(_edited_adapter(blob, meta_key, change))
    for key in RAW_ADAPTER_FILES:
        (files / f"adapter-{key}.safetensors").write_bytes(_raw_adapter(key, blob, rng))
    (files / "devzero.safetensors").symlink_to("/dev/zero")

    ok = files / "peft-ok"
    for key, change in {**PEFT_EDITS, **GUARDED_PEFT_EDITS}.items():
        _peft_dir(files / f"peft-{key}", ok, change)
    shutil.copytree(ok, files / "peft-config-is-a-dir")
    (files / "peft-config-is-a-dir" / "adapter_config.json").unlink()
    (files / "peft-config-is-a-dir" / "adapter_config.json").mkdir()
    shutil.copytree(ok, files / "peft-weights-missing")
    (files / "peft-weights-missing" / "adapter_model.safetensors").unlink()
    shutil.copytree(ok, files / "peft-weights-garbage")
    (files / "peft-weights-garbage" / "adapter_model.safetensors").write_bytes(rng.randbytes(4096))
    shutil.copytree(ok, files / "peft-weights-dev-zero")
    (files / "peft-weights-dev-zero" / "adapter_model.safetensors").unlink()
    (files / "peft-weights-dev-zero" / "adapter_model.safetensors").symlink_to("/dev/zero")

    work, scratch = root / "work", root / "scratch"
    shutil.copytree(home, work, symlinks=True)
    scratch.mkdir()
    yield Env(home, files, data, pred, digest, work, scratch, registry_state(home))
    (files / "ro").chmod(0o700)


# ------------------------------------------------------------------------------------ state and running


def registry_state(home: Path) -> dict[str, Any]:
    """Every row of every table of the SQLite database, and every entry under artifacts/ (a file by its
    bytes' hash, a folder or a link as such)."""
    tables: dict[str, list[str]] = {}
    db = home / "hub.db"
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for name in names:
            tables[name] = sorted(repr(row) for row in connection.execute(f'SELECT * FROM "{name}"'))
    finally:
        connection.close()
    return {"tables": tables, "artifacts": tree_state(home / "artifacts")}


def tree_state(root: Path) -> dict[str, str]:
    """Each path under ``root`` (``root`` itself included) as file:sha256, dir, link:target, or absent."""
    if not os.path.lexists(root):
        return {".": "absent"}
    entries: dict[str, str] = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
        name = str(path.relative_to(root))
        if path.is_symlink():
            entries[name] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            entries[name] = "dir"
        elif path.is_file():
            entries[name] = "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[name] = "other"
    return entries


def damage_store(home: Path, digest: str, store: str) -> None:
    blob = home / "artifacts" / "sha256" / digest[:2] / digest[2:]
    data = blob.read_bytes()
    blob.chmod(0o600)
    blob.unlink()
    if store == "blob-dir":
        blob.mkdir()
    elif store == "blob-corrupt":
        blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif store == "blob-devzero":
        blob.symlink_to("/dev/zero")
    else:
        assert store == "blob-missing", store


class CaseTimeout(BaseException):
    """Raised by the alarm in a case still running after its limit (a BaseException: CliRunner catches an
    Exception and reports it as the command's own)."""


@dataclass
class Outcome:
    exit_code: int | None
    stdout: str
    stderr: str
    exception: str | None  # repr of an exception other than SystemExit, or why no result came back
    seconds: float


def run_here(argv: list[str], limit: float = HANG_S) -> Outcome:
    def alarm(_signum: int, _frame: Any) -> None:
        raise CaseTimeout(f"still running after {limit:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    start = time.perf_counter()
    try:
        result = CliRunner().invoke(cli(), argv)
    except CaseTimeout as exc:
        return Outcome(None, "", "", repr(exc), time.perf_counter() - start)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    took = time.perf_counter() - start
    exc = result.exception
    shown = None if exc is None or isinstance(exc, SystemExit) else repr(exc)[:300]
    return Outcome(result.exit_code, result.stdout, result.stderr, shown, took)


def _address_space() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def _cap_address_space(growth: int) -> tuple[int, int]:
    """Let this process's address space grow by ``growth`` bytes at most; returns the previous limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + growth
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    return soft, hard


def run_guarded(argv: list[str]) -> Outcome:
    """The case in a child process forked from this one (torch is already imported, so it starts at once),
    its address space capped at GUARD_GROWTH above this one's, killed after GUARD_S."""
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: run, send the outcome, leave without running this process's exit handlers
        status = 1
        try:
            os.close(read_end)
            _cap_address_space(GUARD_GROWTH)
            outcome = run_here(argv, GUARD_S)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps(vars(outcome)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks: list[bytes] = []
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            left = start + GUARD_S + 1 - time.perf_counter()
            if not select.select([pipe], [], [], max(left, 0))[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                took = time.perf_counter() - start
                return Outcome(None, "", "", f"still running after {GUARD_S:.0f} s: killed", took)
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return Outcome(None, "", "", f"the child process died (wait status {status})", time.perf_counter() - start)
    return Outcome(**json.loads(b"".join(chunks)))


@pytest.fixture(scope="module", autouse=True)
def capped_memory(env: Env) -> Iterator[None]:  # after env: its imports are not counted as growth
    """In this process too the address space may grow by MEMORY_GROWTH at most while the cases run: a check
    that is missing becomes a MemoryError, not a machine out of memory."""
    soft, hard = _cap_address_space(MEMORY_GROWTH)
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def describe(outcome: Outcome) -> str:
    return (f"exit={outcome.exit_code} stderr={outcome.stderr.strip()[:300]!r} exception={outcome.exception} "
            f"took={outcome.seconds:.1f}s")  # fmt: skip


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    tables = [t for t in set(before["tables"]) | set(after["tables"])
              if before["tables"].get(t) != after["tables"].get(t)]  # fmt: skip
    changed = [f"table {t}" for t in sorted(tables)]
    if before["artifacts"] != after["artifacts"]:
        changed.append("artifacts")
    return changed


@pytest.mark.parametrize("label", list(CASES))
def test_bad_input_is_one_line_exit_1_and_changes_nothing(label: str, env: Env):
    spec = CASES[label]
    if spec.needs_non_root and os.geteuid() == 0:
        pytest.skip("root ignores file modes")
    scratch = Path(tempfile.mkdtemp(dir=env.scratch))
    if spec.store == "intact":  # the shared copy, as built (put back after any case that changed it)
        home, before = env.work, env.pristine_state
    else:
        home = scratch / "home"
        shutil.copytree(env.home, home, symlinks=True)
        damage_store(home, env.digest, spec.store)
        before = registry_state(home)
    argv = ["--home", str(home), *(env.fill(a, scratch) for a in spec.argv)]
    watched = [Path(env.fill(w, scratch)) for w in spec.watch]
    watched_before = [tree_state(w) for w in watched]

    outcome = run_guarded(argv) if spec.guard else run_here(argv)

    after = registry_state(home)
    if spec.store == "intact" and (after != before or outcome.exit_code is None):
        env.reset()
    problems = []
    lines = outcome.stderr.strip().splitlines()
    succeeded = spec.may_succeed and outcome.exit_code == 0
    if outcome.exception is not None:
        problems.append("raised")
    if "Traceback" in outcome.stdout + outcome.stderr:
        problems.append("traceback in the output")
    if not succeeded and outcome.exit_code != 1:
        problems.append(f"exit code {outcome.exit_code}")
    expected_line = re.compile(spec.report or "^Error: ")
    if not succeeded and not (len(lines) == 1 and expected_line.match(lines[0])):
        problems.append(f"{len(lines)} stderr lines" if len(lines) != 1 else "stderr line lacks 'Error: '")
    if DEFECT in outcome.stderr:  # the CLI's last resort: an exception no check turned into a refusal
        problems.append("reported as a defect")
    if spec.bounded and outcome.seconds >= BOUNDED_S:
        problems.append(f"took {outcome.seconds:.1f} s")
    if not succeeded:  # a refusal changes nothing
        problems += [f"changed {what}" for what in changes(before, after)]
        problems += [f"changed {w}" for w, b in zip(watched, watched_before) if tree_state(w) != b]
    if problems:
        pytest.fail(f"{', '.join(problems)} | {describe(outcome)}", pytrace=False)
