"""Prompt classifier: the loss against a float64 numpy reference, label errors, training (head only and with the
encoder) to high held-out accuracy on separable templated prompts, save/load, balance and route."""
import numpy as np
import pytest

from alignment.config import load_config_file
from alignment.pas import classifier
from alignment.pas.embed import embedder_from_config

DIMS = ("ability", "language")
TEMPLATES = {
    ("math", "en"): ["What is {a} plus {b}?", "Solve for x: {a}x + {b} = {c}."],
    ("math", "zh"): ["{a}加{b}等于多少？", "解方程：{a}x + {b} = {c}。"],
    ("writing", "en"): ["Write a poem about {topic}.", "Write a short story about {topic}."],
    ("writing", "zh"): ["写一首关于{topic_zh}的诗。", "写一个关于{topic_zh}的短故事。"],
    ("code", "en"): ["Write a Python function that {task}.", "Implement code that {task}."],
    ("code", "zh"): ["用Python写一个函数，{task_zh}。", "写代码实现：{task_zh}。"],
}


def labelled_prompts(n: int, seed: int) -> list[dict]:
    """n prompts cycling through the six (ability, language) cells, slots filled at random."""
    rng = np.random.default_rng(seed)
    pick = lambda options: options[int(rng.integers(len(options)))]
    cells = list(TEMPLATES)
    out = []
    for i in range(n):
        ability, language = cells[i % len(cells)]
        prompt = pick(TEMPLATES[ability, language]).format(
            a=int(rng.integers(2, 99)), b=int(rng.integers(2, 99)), c=int(rng.integers(2, 99)),
            topic=pick(["the sea", "a city", "autumn", "a dog"]), topic_zh=pick(["大海", "城市", "秋天", "小狗"]),
            task=pick(["reverses a string", "sorts a list"]), task_zh=pick(["反转字符串", "排序列表"]))
        out.append({"prompt": prompt, "ability": ability, "language": language})
    return out


@pytest.fixture(scope="module")
def embedder():
    return embedder_from_config(load_config_file("configs/sft.py"), max_length=48, batch_size=32)  # tiny, random


@pytest.fixture(scope="module")
def trained(embedder):
    return classifier.train_classifier(labelled_prompts(120, seed=0), embedder, DIMS, steps=150, lr=3e-2)


def accuracy(clf, records):
    predictions = clf.predict([r["prompt"] for r in records])
    return {d: float(np.mean([p[d][0] == r[d] for p, r in zip(predictions, records)])) for d in DIMS}


def test_loss_matches_a_float64_numpy_reference():
    rng = np.random.default_rng(0)
    sizes = {"ability": 3, "language": 4}
    head = {d: {"kernel": rng.normal(size=(8, k)).astype(np.float32),
                "bias": rng.normal(size=k).astype(np.float32)} for d, k in sizes.items()}
    x = rng.normal(size=(5, 8)).astype(np.float32)
    labels = {d: rng.integers(0, k, size=5).astype(np.int32) for d, k in sizes.items()}
    total, count, metrics = classifier.classification_loss(head, x, labels)

    expected, correct = 0.0, {}
    for d in sizes:
        logits = x.astype(np.float64) @ head[d]["kernel"].astype(np.float64) + head[d]["bias"]
        top = logits.max(-1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
        expected += (lse - logits[np.arange(5), labels[d]]).sum()
        correct[d] = (logits.argmax(-1) == labels[d]).sum()
    assert float(total) == pytest.approx(expected, rel=1e-5) and count == 5
    assert {d: int(metrics[f"{d}_correct"]) for d in sizes} == correct


def test_bad_labels_name_the_record_and_field():
    records = [{"prompt": "a", "ability": "math"}, {"prompt": "b"}]
    with pytest.raises(ValueError, match=r"record 1: missing label field 'ability'"):
        classifier.label_vocabularies(records, ["ability"])
    with pytest.raises(ValueError, match=r"record 0: field 'ability' has unknown label 'math'"):
        classifier.encode_labels(records, {"ability": ("code", "writing")})


def test_head_reaches_high_held_out_accuracy_and_round_trips(trained, embedder, tmp_path):
    clf, losses = trained
    assert clf.vocabs == {"ability": ("code", "math", "writing"), "language": ("en", "zh")}
    assert losses[0] == pytest.approx(np.log(3) + np.log(2), rel=1e-5)  # zero head: uniform predictions
    held_out = labelled_prompts(60, seed=1)
    assert all(a >= 0.95 for a in accuracy(clf, held_out).values()), accuracy(clf, held_out)

    path = str(tmp_path / "head.npz")
    clf.save(path)
    loaded = classifier.load_classifier(path, embedder)
    texts = [r["prompt"] for r in held_out[:12]]
    assert loaded.predict(texts) == clf.predict(texts) and not loaded.encoder_tuned


def test_fine_tuning_the_encoder_lowers_the_loss_and_saves_the_encoder(embedder, tmp_path):
    clf, losses = classifier.train_classifier(labelled_prompts(60, seed=2), embedder, DIMS, steps=12, batch_size=16,
                                              lr=3e-2, finetune_encoder=True, encoder_lr=1e-3)
    assert np.mean(losses[-3:]) < 0.5 * losses[0] and clf.encoder_tuned
    path = str(tmp_path / "tuned.npz")
    clf.save(path)
    loaded = classifier.load_classifier(path, embedder)  # the original embedder gets the tuned weights back
    texts = [r["prompt"] for r in labelled_prompts(6, seed=3)]
    np.testing.assert_allclose(loaded.embedder.embed(texts), clf.embedder.embed(texts), atol=1e-6)
    assert not np.allclose(embedder.embed(texts), clf.embedder.embed(texts), atol=1e-4)


def test_balance_hits_the_proportions_and_reports_drops():
    records = [{"id": i, "ability": a} for i, a in enumerate(["math"] * 60 + ["writing"] * 30 + ["code"] * 10)]
    labels = [{"ability": (r["ability"], 0.9)} for r in records]  # predict's format
    kept, report = classifier.balance(records, labels, "ability", {"math": 2, "writing": 1, "code": 1}, seed=0)
    counts = {a: sum(r["ability"] == a for r in kept) for a in ("math", "writing", "code")}
    assert counts == {"math": 20, "writing": 10, "code": 10}  # code (10 at 1/4) caps the total at 40
    assert report["math"] == {"available": 60, "kept": 20, "dropped": 40} and report["code"]["dropped"] == 0
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)  # original order

    kept, report = classifier.balance(records, [{"ability": r["ability"]} for r in records], "ability",
                                      {"math": 0.5, "writing": 0.5}, seed=1)
    assert report["code"] == {"available": 10, "kept": 0, "dropped": 10} and len(kept) == 60
    with pytest.raises(ValueError, match="no records labelled \\['poetry'\\]"):
        classifier.balance(records, labels, "ability", {"poetry": 1.0})


def test_route_sends_each_prompt_to_its_labels_destination(trained):
    clf, _ = trained
    records = labelled_prompts(6, seed=4)
    predictions = clf.predict([r["prompt"] for r in records])
    destinations = classifier.route(predictions, "ability", {"math": "math-pool", "code": "code-pool"},
                                    default="general")
    expected = {"math": "math-pool", "code": "code-pool", "writing": "general"}
    assert destinations == [expected[r["ability"]] for r in records]
    assert classifier.route(predictions, "ability", {"math": "m", "code": "c", "writing": "w"}, default="unsure",
                            min_prob=1.01) == ["unsure"] * 6
    with pytest.raises(ValueError, match=r"record 2: label 'writing' \(ability"):
        classifier.route(predictions, "ability", {"math": "m", "code": "c"})
