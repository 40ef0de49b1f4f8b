"""Generate the bundled example tasks under ``examples/data/`` (deterministic: same bytes on every run).

Tasks, each written as ``<task>.train.jsonl`` and ``<task>.test.jsonl`` in the alpaca layout
``{"instruction": ..., "input": ..., "output": ...}``:

* ``reverse``  -- reverse the order of the words of a short sentence (synthetic, exact answer)
* ``arith``    -- add two integers of 1-3 digits (synthetic, exact answer)
* ``caps``     -- uppercase a short list of words (synthetic, exact answer)
* ``fanoutqa`` -- short-answer sub-questions of the FanOutQA dev set (real text, CC BY-SA 4.0)
* ``mix``      -- a shuffled mix of the four tasks' train (and test) splits, for the MixLoRA job

plus ``arith_mc.test.jsonl``: the arith test split as multiple choice
``{"question": ..., "choices": [4 strings], "answer": index}``.

Usage::

    .venv/bin/python examples/make_data.py [--out-dir examples/data]

Only the standard library is used; the FanOutQA file is read straight from the installed
``fanoutqa`` package (``<package dir>/data/fanout-final-dev.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SEED = 1234
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "data"

SYNTH_TRAIN = 600  # train records per synthetic task
SYNTH_TEST = 100  # test records per synthetic task
FANOUT_TEST_FRACTION = 0.2
FANOUT_MAX_ANSWER_CHARS = 40
MIX_TRAIN_PER_TASK = 300
MIX_TEST_PER_TASK = 50

REVERSE_INSTRUCTION = "Reverse the order of the words."
ARITH_INSTRUCTION = "Add the two numbers."
CAPS_INSTRUCTION = "Write the words in uppercase."

# Common, short English words; each is a single lowercase ASCII token without spaces.
VOCAB: tuple[str, ...] = (
    "red", "blue", "green", "big", "small", "old", "new", "hot", "cold", "happy",
    "apple", "table", "dog", "cat", "house", "tree", "car", "book", "bird", "fish",
    "sun", "moon", "river", "road", "chair", "door", "window", "garden", "city", "boat",
    "milk", "bread", "water", "cake", "hat", "shoe", "ball", "box", "cup", "pen",
    "on", "in", "under", "near", "with", "by", "over", "and", "the", "a",
    "runs", "eats", "sees", "likes", "jumps", "sleeps", "reads", "sings", "walks", "opens",
    "fast", "slowly", "today", "here", "now", "again", "very", "quiet", "bright", "soft",
)  # fmt: skip

Record = dict[str, Any]


# ---------------------------------------------------------------- helpers


def _unique(rng: random.Random, make: Any, count: int, taken: set[str]) -> list[Record]:
    """Draw ``count`` records from ``make(rng)`` whose inputs are new (not in ``taken``); updates ``taken``."""
    out: list[Record] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > count * 1000:
            raise RuntimeError(f"could not draw {count} distinct inputs")
        rec = make(rng)
        if rec["input"] in taken:
            continue
        taken.add(rec["input"])
        out.append(rec)
    return out


def _split_synthetic(name: str, make: Any, seed: int) -> tuple[list[Record], list[Record]]:
    """Test split first, then a train split whose inputs never appear in test."""
    rng = random.Random(f"{seed}:{name}")
    taken: set[str] = set()
    test = _unique(rng, make, SYNTH_TEST, taken)
    train = _unique(rng, make, SYNTH_TRAIN, taken)
    return train, test


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))]


# ---------------------------------------------------------------- synthetic tasks


def reverse_answer(text: str) -> str:
    """The words of ``text`` in reverse order, single-spaced."""
    return " ".join(reversed(text.split()))


def arith_answer(text: str) -> str:
    """The sum for an input like ``"37 + 485"``."""
    left, plus, right = text.split()
    if plus != "+":
        raise ValueError(f"not an addition: {text!r}")
    return str(int(left) + int(right))


def caps_answer(text: str) -> str:
    """``text`` in uppercase."""
    return text.upper()


def _make_reverse(rng: random.Random) -> Record:
    sentence = " ".join(_words(rng, 3, 6))
    return {"instruction": REVERSE_INSTRUCTION, "input": sentence, "output": reverse_answer(sentence)}


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _make_arith(rng: random.Random) -> Record:
    text = f"{_operand(rng)} + {_operand(rng)}"
    return {"instruction": ARITH_INSTRUCTION, "input": text, "output": arith_answer(text)}


def _make_caps(rng: random.Random) -> Record:
    text = " ".join(_words(rng, 2, 5))
    return {"instruction": CAPS_INSTRUCTION, "input": text, "output": caps_answer(text)}


# ---------------------------------------------------------------- fanoutqa


def fanoutqa_path() -> Path:
    """The FanOutQA dev-set JSON inside the installed ``fanoutqa`` package."""
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fanoutqa package is not installed (pip install --no-deps fanoutqa)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "fanout-final-dev.json"


def _short_answer(answer: Any) -> str | None:
    """A short string for a scalar answer; None for lists, dicts, empty or long answers."""
    if isinstance(answer, bool):
        text = "Yes" if answer else "No"
    elif isinstance(answer, (int, float)):
        text = str(answer)
    elif isinstance(answer, str):
        text = " ".join(answer.split())
    else:
        return None
    if not text or len(text) > FANOUT_MAX_ANSWER_CHARS:
        return None
    return text


def _walk(decomposition: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for sub in decomposition:
        yield sub
        yield from _walk(sub.get("decomposition") or [])


def _fanoutqa(seed: int, path: Path | None = None) -> tuple[list[Record], list[Record]]:
    """Short-answer sub-questions, split by top-level question (~80/20) so related items stay together."""
    with open(path or fanoutqa_path(), encoding="utf-8") as fh:
        questions = json.load(fh)
    seen: set[str] = set()
    groups: list[list[Record]] = []
    for top in questions:
        group: list[Record] = []
        for sub in _walk(top.get("decomposition") or []):
            question = " ".join(str(sub.get("question", "")).split())
            answer = _short_answer(sub.get("answer"))
            if not question or answer is None or question in seen:
                continue
            seen.add(question)
            group.append({"instruction": question, "input": "", "output": answer})
        if group:
            groups.append(group)
    rng = random.Random(f"{seed}:fanoutqa")
    rng.shuffle(groups)
    total = sum(len(g) for g in groups)
    test: list[Record] = []
    train: list[Record] = []
    for group in groups:
        (test if len(test) < total * FANOUT_TEST_FRACTION else train).extend(group)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# ---------------------------------------------------------------- mix and multiple choice


def _mix(
    splits: dict[str, tuple[list[Record], list[Record]]], seed: int
) -> tuple[list[Record], list[Record]]:
    rng = random.Random(f"{seed}:mix")
    train: list[Record] = []
    test: list[Record] = []
    for name in sorted(splits):
        tr, te = splits[name]
        train.extend(tr[:MIX_TRAIN_PER_TASK])
        test.extend(te[:MIX_TEST_PER_TASK])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def arith_mc(test: list[Record], seed: int) -> list[Record]:
    """Multiple-choice form of the arith test split: the sum and three nearby wrong sums."""
    rng = random.Random(f"{seed}:arith_mc")
    out: list[Record] = []
    for rec in test:
        right = int(rec["output"])
        offsets = [d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0]
        if right >= 100:
            offsets += [-100, 100]
        wrong = rng.sample(offsets, 3)
        choices = [right + d for d in wrong]
        index = rng.randrange(4)
        choices.insert(index, right)
        out.append(
            {"question": f"What is {rec['input']}?", "choices": [str(c) for c in choices], "answer": index}
        )
    return out


# ---------------------------------------------------------------- output


def _write_jsonl(path: Path, records: list[Record]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    path.write_bytes("".join(lines).encode("utf-8"))


def build(seed: int = SEED, fanoutqa_file: Path | None = None) -> dict[str, list[Record]]:
    """All files' records, keyed by file name (without the directory)."""
    splits = {
        "reverse": _split_synthetic("reverse", _make_reverse, seed),
        "arith": _split_synthetic("arith", _make_arith, seed),
        "caps": _split_synthetic("caps", _make_caps, seed),
        "fanoutqa": _fanoutqa(seed, fanoutqa_file),
    }
    splits["mix"] = _mix(splits, seed)
    files: dict[str, list[Record]] = {}
    for name, (train, test) in splits.items():
        files[f"{name}.train.jsonl"] = train
        files[f"{name}.test.jsonl"] = test
    files["arith_mc.test.jsonl"] = arith_mc(splits["arith"][1], seed)
    return files


def main(out_dir: str | Path = DEFAULT_OUT_DIR, seed: int = SEED) -> dict[str, int]:
    """Write every task file under ``out_dir``; return the record count of each file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, records in build(seed).items():
        _write_jsonl(out / name, records)
        counts[name] = len(records)
    return counts


def _cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where to write the .jsonl files")
    parser.add_argument("--seed", type=int, default=SEED, help="changing it changes every file")
    args = parser.parse_args(argv)
    for name, count in main(args.out_dir, args.seed).items():
        print(f"{count:6d}  {Path(args.out_dir) / name}")


if __name__ == "__main__":
    _cli()
