"""The text of the unseen phrasings (`mergeserve.tasks.phrasings` draws the probe prompts
from it): ten per demo task, the first five the dev part, the last five the test part.

A leaf module, data only, so that the training generators (`generators.generate(...,
composed=True)`) can keep composed prompts off every evaluation phrasing without importing
the probe machinery, which imports them.
"""

from __future__ import annotations

PROBE_PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse_words": (
        # dev
        "Take the words {words} and say them backwards (word by word, not letters).",
        "Backwards word order, please: {words}",
        "Here's a list of words: {words}. What's that list in reverse?",
        "reverse these words for me -> {words}",
        "Starting with the final word and ending with the first, repeat: {words}",
        # test
        "Could you flip this around so the last word comes first? {words}",
        "Words in, reversed words out. {words}",
        "My teacher wants these words in the opposite order: {words}",
        "Rewrite the sequence {words} from end to beginning.",
        "What are the words {words} in reverse order?",
    ),
    "add": (
        # dev
        "What's {a} and {b} added together?",
        "Quick math: {a} + {b}",
        "Total up {a} and {b} for me.",
        "I bought something for {a} dollars and another thing for {b} dollars. How much did I spend in total? Just the number.",  # noqa: E501
        "Add up: {a}, {b}",
        # test
        "What does {a} plus {b} come to?",
        "Can you work out the sum of {a} and {b}?",
        "{a} and {b} - what's the sum?",
        "Please tell me what {a} + {b} is.",
        "Adding {b} to {a} gives what number?",
    ),
    "sort_numbers": (
        # dev
        "Order these from lowest to highest: {c}",
        "Put the following in ascending order, please: {s}",
        "Smallest first, sort {c}",
        "Can you rearrange {c} so they go up in value?",
        "sort these numbers small to large: {c}",
        # test
        "List {c} in increasing order.",
        "Here are some numbers: {c}. Sort them from least to greatest.",
        "What is {c} sorted from smallest to largest?",
        "Arrange in ascending order -> {s}",
        "I need {c} ordered from the lowest value to the highest.",
    ),
    "capital": (
        # dev
        "What's the capital city of {country}?",
        "Tell me {country}'s capital.",
        "Which city serves as the capital of {country}?",
        "Quick question: capital of {country}?",
        "Name {country}'s capital city, nothing else.",
        # test
        "In {country}, which city is the capital?",
        "What city is the seat of government of {country}?",
        "I'm writing a quiz. What is the capital of {country}?",
        "The capital city of {country} - what is it?",
        "{country}'s capital is?",
    ),
    "sentiment": (
        # dev
        "Is this review positive or negative? {review}",
        "Someone left this feedback: {review} Positive or negative?",
        "Judge the tone of this review (positive/negative): {review}",
        "Would you say the following review is positive or negative? {review}",
        "Product review: {review}\nSentiment - positive or negative?",
        # test
        "Read this review and tell me if it's positive or negative: {review}",
        "Thumbs up or thumbs down? Answer positive or negative for: {review}",
        "What is the sentiment of this customer review, positive or negative? {review}",
        "A shopper wrote: {review} Is that a positive or a negative review?",
        "Classify as positive or negative.\n{review}",
    ),
    "to_json": (
        # dev
        "Turn {pairs} into a JSON object.",
        "Please format these as JSON: {pairs}",
        "Convert the following key=value pairs to JSON, same order: {pairs}",
        "JSON object for: {pairs}",
        "Can you give me {pairs} in JSON?",
        # test
        "Output a JSON object with these fields: {pairs}",
        "I have {pairs}. Write it as a JSON object.",
        "Serialize {pairs} to JSON.",
        "Express these pairs as JSON -> {pairs}",
        "What is the JSON form of {pairs}?",
    ),
}
