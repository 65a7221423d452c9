"""An offline, deterministic toy corpus plus tokenizer, so a tiny model can be trained end to end anywhere.

The text is drawn from templates over a small lexicon (arithmetic, simple facts, short stories), so it is
highly regular: a tiny transformer's loss falls visibly within a hundred or two steps, which makes the demo
and smoke tests meaningful without any download.

    python -m megolmo.data.demo_corpus --output DIR   ->   DIR/corpus.jsonl, DIR/tokenizer.json, DIR/tokens.npy
"""

from __future__ import annotations

import argparse
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megolmo.data.prepare import EOS_TOKEN, prepare_data

NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
    "Canada": "Ottawa", "Germany": "Berlin", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "dark", "coal": "black"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot"}
ANIMALS = ["fox", "rabbit", "bear", "mouse", "bird", "frog", "turtle", "cat", "dog", "owl"]
NAMES = ["Tom", "Lily", "Max", "Anna", "Ben", "Mia", "Sam", "Zoe"]
ADJECTIVES = ["little", "brave", "happy", "sleepy", "clever", "kind", "tiny", "curious"]
PLACES = ["forest", "small house", "garden", "village", "cave", "big tree", "farm", "meadow"]
ACTIVITIES = ["eat berries", "play in the sun", "read books", "sing songs", "dig holes", "jump in puddles"]
FOUND = ["a shiny stone", "a red ball", "a lost key", "a warm hat", "a big apple", "a small boat"]
ENDINGS = [
    "became best friends", "shared the {thing} and laughed", "went home together", "had a picnic by the river",
]

DEMO_VOCAB_SIZE = 2000
CORPUS_NAME, TOKENIZER_NAME, TOKENS_NAME = "corpus.jsonl", "tokenizer.json", "tokens.npy"


def arithmetic(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            sentences.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        else:
            a = rng.randint(1, 20)
            b = rng.randint(0, a)
            sentences.append(f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}.")
    return " ".join(s.capitalize() for s in sentences)


def facts(rng: random.Random) -> str:
    makers = [
        lambda: "The capital of {0} is {1}.".format(*rng.choice(list(CAPITALS.items()))),
        lambda: "The {0} is {1}.".format(*rng.choice(list(COLORS.items()))),
        lambda: "{0} says {1}.".format(*rng.choice(list(SOUNDS.items()))),
        lambda: "{0} is an animal.".format(rng.choice(ANIMALS)),
    ]
    return " ".join(_with_article(rng.choice(makers)()) for _ in range(rng.randint(3, 6)))


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, other = rng.sample(ANIMALS, 2)
    thing = rng.choice(FOUND)
    return " ".join([
        f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {animal} named {name}.",
        f"{name} lived in a {rng.choice(PLACES)}.",
        f"Every day, {name} liked to {rng.choice(ACTIVITIES)}.",
        f"One day, {name} found {thing}.",
        f"Then {name} met a {rng.choice(ADJECTIVES)} {other} named {friend}.",
        f'"Hello, {name}!" said {friend}.',
        f"{name} and {friend} {rng.choice(ENDINGS).format(thing=thing.split(' ', 1)[1])}.",
        "The end.",
    ])


def generate_documents(num_documents: int, seed: int = 0) -> list[str]:
    """The same documents for the same arguments, on every machine and Python version (seeded `random`)."""
    rng = random.Random(seed)
    kinds = [story, story, arithmetic, facts]
    return [rng.choice(kinds)(rng) for _ in range(num_documents)]


def train_tokenizer(documents: list[str], vocab_size: int = DEMO_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (GPT-2 / OLMo style) with EOS as the only special token, id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def build_demo_corpus(output_dir: str, num_documents: int = 4000, seed: int = 0) -> dict[str, str]:
    """Write whichever of corpus, tokenizer and token file is missing; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in (CORPUS_NAME, TOKENIZER_NAME, TOKENS_NAME)}
    documents = None
    if not os.path.exists(paths[CORPUS_NAME]):
        documents = generate_documents(num_documents, seed)
        _write_atomic(paths[CORPUS_NAME], "".join(json.dumps({"text": d}) + "\n" for d in documents))
    if not os.path.exists(paths[TOKENIZER_NAME]):
        if documents is None:
            with open(paths[CORPUS_NAME], encoding="utf-8") as f:
                documents = [json.loads(line)["text"] for line in f]
        _write_atomic(paths[TOKENIZER_NAME], train_tokenizer(documents).to_str(pretty=True))
    if not os.path.exists(paths[TOKENS_NAME]):
        prepare_data([paths[CORPUS_NAME]], paths[TOKENIZER_NAME], output_dir, dtype="uint16", progress=False)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the offline demo corpus, tokenizer and token file.")
    parser.add_argument("--output", required=True, help="directory to write into (existing outputs are kept)")
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_demo_corpus(args.output, args.documents, args.seed)
    vocab_size = Tokenizer.from_file(paths[TOKENIZER_NAME]).get_vocab_size()
    num_tokens = os.path.getsize(paths[TOKENS_NAME]) // 2
    print(f"{paths[TOKENS_NAME]}: {num_tokens} tokens (uint16), vocabulary {vocab_size}, EOS {EOS_TOKEN} = id 0")


def _with_article(sentence: str) -> str:
    """'owl says hoot.' -> 'An owl says hoot.'; sentences that already start with 'The' are kept."""
    if sentence.startswith("The "):
        return sentence
    return ("An " if sentence[0] in "aeiou" else "A ") + sentence


def _write_atomic(path: str, text: str) -> None:
    """Write then rename, so an interrupted run never leaves a partial file that a rerun would skip."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
