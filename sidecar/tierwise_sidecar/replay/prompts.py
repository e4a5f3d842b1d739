"""The words of the SYNTHETIC reference trace: templates and word lists per difficulty, so the
prompts read as English and differ, and the short answers a multi-turn session carries. Made up
here; nothing in them comes from a real workload."""

from __future__ import annotations

import random

from tierwise_sidecar.replay.trace import Label

_EASY = (
    "What is the capital of {country}?",
    "Who wrote {book}?",
    "How many {small} are in a {big}?",
    "Define {term} in one sentence.",
    "What is the boiling point of {liquid} at sea level?",
    "Translate '{phrase}' into {language}.",
    "Is {animal} a mammal? Answer yes or no.",
    "What does the acronym {acronym} stand for?",
    "Spell {word} backwards.",
    "What time zone is {city} in?",
)
_MEDIUM = (
    "Explain how {concept} works to a {audience}, with one concrete example.",
    "Summarize the trade-offs between {tech_a} and {tech_b} for a {team} team in five bullet points.",
    "Write a polite email to {person} explaining that {situation}.",
    "Give three practical tips for {activity}, each in two sentences.",
    "Compare {country} and {country2} on {topic} in a short paragraph.",
    "Rewrite this sentence so a {audience} understands it: '{jargon}'.",
    "What are the main causes of {problem}, and what can a {team} team do about it?",
)
_HARD = (
    "Write a Python function that {task}, starting from the signature `def solve(data: list[int]) -> "
    "list[int]`. Use type hints, handle edge cases, and add pytest tests.",
    "A train leaves {city} at {hour}:00 at {speed} km/h; another leaves {city2}, {distance} km away, "
    "one hour later at {speed2} km/h towards it. When and where do they meet? Reason step by step.",
    "Design a service that handles {rps} requests per second for {product}. Describe the data model, "
    "the failure modes, how it scales, and how you would test it. Justify each choice.",
    "This {lang} code is slow on large inputs; find why, then rewrite it and prove the new complexity:\n\n"
    "```\nfor (i = 0; i < n; i++) {{\n  for (j = 0; j < n; j++) {{\n"
    "    if (a[i] == b[j]) {{ out.push({fn}(i, j)); }}\n  }}\n}}\n```",
    "Prove that {claim}. Give a rigorous proof, then explain the key step in plain words.",
    "Write a SQL query over orders(id, customer_id, total, created_at) and customers(id, region) that "
    "{query}, then explain its execution plan and which indexes it needs.",
)
SYSTEM: dict[Label, str] = {
    "easy": "You are a concise assistant. Answer in one short sentence.",
    "medium": "You are a helpful assistant. Answer clearly and in plain English.",
    "hard": "You are an expert engineer and mathematician. Think step by step and show your work.",
}
FOLLOW_UPS = (
    "Can you make that shorter?",
    "Why is that? Explain the reasoning.",
    "Give me another example.",
    "What would change if the numbers doubled?",
    "Now write it as a checklist.",
    "Are there any edge cases you missed?",
    "Translate your answer into French.",
    "What is the most common mistake people make here?",
)
_WORDS: dict[str, tuple[str, ...]] = {
    "country": ("France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "India", "Chile", "Egypt",
                "Vietnam", "Poland", "Peru", "Ghana", "Italy", "Mexico", "Spain"),
    "book": ("Moby-Dick", "Pride and Prejudice", "War and Peace", "Dune", "Beloved", "Ulysses",
             "The Trial", "Middlemarch", "Don Quixote", "Things Fall Apart", "Hamlet", "Emma"),
    "small": ("seconds", "minutes", "grams", "centimetres", "millilitres", "days", "inches", "ounces"),
    "big": ("hour", "day", "kilogram", "metre", "litre", "week", "foot", "pound", "year"),
    "term": ("latency", "entropy", "inflation", "photosynthesis", "a mutex", "idempotence", "osmosis",
             "a hash function", "compound interest", "a load balancer", "recursion", "a vaccine"),
    "liquid": ("water", "ethanol", "acetone", "olive oil", "milk", "methanol"),
    "phrase": ("good morning", "thank you very much", "where is the station", "I am hungry",
               "see you tomorrow", "the bill, please"),
    "language": ("Spanish", "German", "Japanese", "Italian", "Portuguese", "Swahili", "Dutch"),
    "animal": ("a dolphin", "a bat", "a penguin", "a platypus", "a shark", "a whale", "a lizard"),
    "acronym": ("HTTP", "NASA", "GDP", "RAM", "UNESCO", "DNA", "SQL", "LASER", "SCUBA"),
    "word": ("gateway", "kubernetes", "budget", "throughput", "sidecar", "operator", "replica"),
    "city": ("Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Delhi", "Austin", "Seoul", "Cairo", "Perth"),
    "concept": ("TCP congestion control", "a vaccine", "public-key cryptography", "a bloom filter",
                "garbage collection", "a mortgage", "DNS resolution", "gradient descent", "a heat pump",
                "container networking", "database indexing", "the immune system"),
    "audience": ("ten-year-old", "new hire", "product manager", "retired teacher", "first-year student"),
    "tech_a": ("PostgreSQL", "Kafka", "REST", "monoliths", "Python", "server-side rendering"),
    "tech_b": ("MongoDB", "RabbitMQ", "gRPC", "microservices", "Go", "single-page apps"),
    "team": ("five-person", "platform", "data", "mobile", "security", "support"),
    "person": ("a customer", "my landlord", "the hiring manager", "a supplier", "our CFO", "a colleague"),
    "situation": ("the delivery will be two weeks late", "the invoice was sent twice",
                  "the meeting has moved to Thursday", "we cannot renew the contract",
                  "the outage yesterday lost no data"),
    "activity": ("running a first marathon", "learning to cook on a budget", "writing clear commit messages",
                 "preparing for a job interview", "reducing cloud costs", "sleeping better"),
    "topic": ("public transport", "renewable energy", "education", "tourism", "food culture"),
    "country2": ("Germany", "Australia", "Argentina", "Morocco", "Sweden", "Thailand"),
    "jargon": ("we need to leverage synergies to move the needle on KPIs",
               "the p99 latency regressed after the canary rollout",
               "the loan is amortised over a thirty-year term"),
    "problem": ("flaky integration tests", "employee burnout", "traffic congestion", "slow page loads",
                "alert fatigue"),
    "task": ("merges overlapping intervals", "parses ISO 8601 durations", "finds the k most frequent words",
             "validates a Sudoku board", "computes a rolling median over a stream",
             "detects a cycle in a directed graph", "rate-limits calls with a token bucket"),
    "hour": ("6", "7", "8", "9", "10", "14", "15"),
    "speed": ("80", "90", "100", "120", "140"),
    "speed2": ("60", "75", "110", "130"),
    "city2": ("Lyon", "Osaka", "Abuja", "Cusco", "Bergen", "Pune"),
    "distance": ("300", "450", "520", "610", "800"),
    "rps": ("500", "5,000", "50,000", "200,000"),
    "product": ("a URL shortener", "a chat app", "a payments ledger", "a ride-hailing dispatcher",
                "a feature-flag service", "an LLM gateway"),
    "lang": ("JavaScript", "Java", "C++", "C#"),
    "fn": ("pair", "merge", "score"),
    "claim": ("there are infinitely many primes", "the square root of 2 is irrational",
              "every tree with n nodes has n - 1 edges", "a binary heap insert is O(log n)",
              "the sum of the first n odd numbers is n squared"),
    "query": ("finds each region's top three customers by total spend last quarter",
              "computes month-over-month revenue growth per region",
              "lists customers whose first and latest orders are more than a year apart"),
}  # fmt: skip
_TEMPLATES: dict[Label, tuple[str, ...]] = {"easy": _EASY, "medium": _MEDIUM, "hard": _HARD}


def prompt(rng: random.Random, label: Label) -> str:
    template = rng.choice(_TEMPLATES[label])
    words = {name: rng.choice(values) for name, values in _WORDS.items() if "{" + name + "}" in template}
    return template.format(**words)


_ANSWERS: dict[Label, tuple[str, ...]] = {
    "easy": ("Sure: it is the one most people name first.", "Yes.", "No, not quite.", "It is about two of them."),
    "medium": (
        "In short, it trades simplicity for flexibility; the example above shows where that pays off.",
        "Here are the main points, in order of how much they matter in practice.",
        "It works in three steps: it receives the request, checks what it already knows, then answers.",
    ),
    "hard": (
        "Step 1: set up the quantities. Step 2: write the equation. Step 3: solve it and check the edge cases.",
        "Here is a first version with tests; its complexity is O(n log n) because of the sort.",
        "The design has three parts: an ingestion queue, a stateless API tier and a replicated store.",
    ),
}


def answer(rng: random.Random, label: Label) -> str:
    return rng.choice(_ANSWERS[label])
