"""Offline sources of varied training prompts (prompt set 2), none of them an evaluation set.

The first prompt set was a few hundred templates; a drafter trained on the target's answers to
them scored far higher on unseen answers of the same templates than on GSM8K, HumanEval and
MT-Bench prompts. These sources widen what the target is asked:
    stdlib_functions   public functions of Python's own standard library, as a signature and a
                       docstring to complete (the HumanEval format, other functions)
    stdlib_passages    prose from standard-library module docstrings, for extraction and
                       summary requests
    WRITING/ROLEPLAY/EXPLAIN   requests composed here across the kinds of chat people send
The lists and the harvest are deterministic: the same Python version gives the same prompts.
"""
from __future__ import annotations

import ast
import sysconfig
from functools import lru_cache
from pathlib import Path

SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                "ensurepip", "turtledemo", "__pycache__"}


def stdlib_functions() -> tuple[str, ...]:
    """Every public top-level standard-library function with a 40..800-character docstring, as
    'def name(args):\n    \"\"\"docstring\"\"\"' (decorators and body dropped)."""
    return _harvest()[0]


def stdlib_passages() -> tuple[str, ...]:
    """Prose paragraphs (200..900 characters, no code) from standard-library module docstrings."""
    return _harvest()[1]


@lru_cache(maxsize=1)
def _harvest() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(functions, passages), from one parse of the standard library (~10 s)."""
    functions, passages = [], []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith("config-") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        functions += [_stub(node) for node in tree.body if _documented_function(node)]
        for para in (ast.get_docstring(tree) or "").split("\n\n"):
            text = " ".join(para.split())
            if 200 <= len(text) <= 900 and ">>>" not in para and "::" not in para:
                passages.append(text)
    return tuple(functions), tuple(passages)


def _documented_function(node: ast.stmt) -> bool:
    doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
    return doc is not None and not node.name.startswith("_") and 40 <= len(doc) <= 800


def _stub(node: ast.FunctionDef) -> str:
    body = [ast.Expr(ast.Constant(ast.get_docstring(node)))]
    return ast.unparse(ast.FunctionDef(name=node.name, args=node.args, body=body, decorator_list=[],
                                       returns=node.returns, type_comment=None, lineno=0)) + "\n"


WRITING_KINDS = (
    "a persuasive blog post", "a short product description", "a cover letter", "a two-minute "
    "speech", "a restaurant review", "a limerick", "a haiku sequence", "a news report",
    "a travel diary entry", "a motivational message", "an apology letter", "a job advertisement",
    "a movie pitch", "a recipe introduction", "a thank-you note", "a debate opening statement",
    "a children's bedtime story", "a museum audio-guide script", "a podcast introduction",
    "a letter to the editor",
)

WRITING_SUBJECTS = (
    "a new bicycle lane in a small town", "a robot that learns to paint", "a rainy weekend",
    "a community garden", "an old lighthouse", "a lost wallet returned by a stranger",
    "a startup selling reusable cups", "the first day at a new school", "a mountain hike",
    "a neighbourhood bakery", "a chess tournament", "a solar-powered boat", "an ancient map",
    "a library that never closes", "a volunteer firefighter", "an electric scooter rental",
    "a street musician", "a family reunion", "a hidden waterfall", "a smartphone detox week",
)

ROLEPLAY_PERSONAS = (
    "a ship's captain in the 1800s", "a friendly librarian", "a medieval blacksmith",
    "a detective in a noir film", "a personal fitness coach", "a tour guide in Rome",
    "a grumpy cat", "a kindergarten teacher", "an astronaut on the International Space Station",
    "a pirate who loves poetry", "a museum curator", "a sports commentator", "a wise old tree",
    "a customer-support agent", "a famous chef", "a time traveller from the year 3000",
)

ROLEPLAY_ASKS = (
    "Introduce yourself and describe a typical day.", "What advice would you give a beginner?",
    "Tell me about the strangest thing that ever happened to you.",
    "How do you deal with a difficult day?", "Describe the place where you work.",
    "What do you think about modern technology?", "Convince me to join you on your next adventure.",
)

EXPLAIN_CONCEPTS = (
    "entropy", "supply and demand", "natural selection", "the Pythagorean theorem", "compound "
    "interest", "the greenhouse effect", "how vaccines train the immune system", "recursion",
    "the difference between weather and climate", "opportunity cost", "how a bill becomes law",
    "the theory of relativity", "DNA replication", "the Renaissance", "how encryption keeps data "
    "safe", "the causes of World War I", "photosynthesis versus respiration", "the scientific "
    "method", "how airplanes fly", "the difference between a virus and a bacterium",
    "impressionist painting", "the Silk Road", "how a transistor works", "plate tectonics",
    "the stoic philosophy", "the role of the central bank", "how tides work", "machine "
    "translation", "the water footprint of food", "the history of the printing press",
    "quantum superposition", "the placebo effect", "how a search engine ranks pages",
    "the ethics of artificial intelligence", "the structure of an atom", "game theory",
)

EXPLAIN_STYLES = (
    "Explain {c} in a few paragraphs.", "How would you teach {c} to a high-school student?",
    "What are common misconceptions about {c}?", "Give a real-world example of {c} and explain it.",
    "Compare {c} with a related idea and point out the differences.",
    "Write three quiz questions about {c}, with answers.",
)

WRITING_STYLES = (
    "Write {k} about {s}.", "Draft {k} about {s}. Keep it under 200 words.",
    "Compose {k} about {s}, in a warm and humorous tone.",
    "Write {k} about {s}, then suggest a title for it.",
)

PASSAGE_TASKS = (
    "Summarize the following text in two sentences.", "List the key terms in the following text "
    "and define each one briefly.", "Rewrite the following text in plain language for a "
    "non-programmer.", "Write three questions that the following text answers, with the answers.",
    "Extract every name of a function, module or format mentioned in the following text, as a "
    "bulleted list.", "What is the main purpose described in the following text? Answer in one "
    "paragraph.",
)
