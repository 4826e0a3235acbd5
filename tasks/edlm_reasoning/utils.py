"""Data and scorer of the edlm_reasoning task, from edlm.recipes.reasoning (needs edlm installed)."""

from __future__ import annotations

import logging

# lm-eval warns on every run that a task built by a function could take --metadata kwargs; this
# one takes none, so the line would only puzzle a reader of the output
logging.getLogger("lm_eval.api.task").addFilter(lambda record: "Custom kwargs" not in record.getMessage())


def held_out_problems(**_metadata) -> dict:
    """The 500 held-out problems as a test split: prompt, response (the worked solution) and answer."""
    import datasets

    from edlm.recipes.reasoning import test_problems

    rows = [{"prompt": p.prompt, "response": p.response, "answer": p.answer} for p in test_problems()]
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the final '#### N' number, as edlm demo and edlm bench score it."""
    from edlm.recipes.reasoning import extract_answer

    return {"exact_match": float(extract_answer(results[0]) == doc["answer"])}
