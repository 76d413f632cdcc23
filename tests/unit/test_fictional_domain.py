"""The demo's invented domain: held-out data is really held out, and every answer is taught."""

from __future__ import annotations

from graft.testing.fictional import (
    documents,
    held_out_documents,
    held_out_questions,
    machines,
    sft_records,
)


def test_held_out_questions_and_logs_never_appear_in_training() -> None:
    ms = machines()
    train_questions = {r["instruction"] for r in sft_records(ms)}
    held = held_out_questions(ms)
    assert len(held) == 4 * len(ms)
    assert not {q["question"] for q in held} & train_questions
    train_text = "\n".join(documents(ms))
    for doc in held_out_documents(ms):
        for sentence in doc.split(". "):
            assert sentence.strip(". ") not in train_text


def test_every_held_out_answer_is_taught_by_documents_and_sft() -> None:
    ms = machines()
    train_text = "\n".join(documents(ms))
    answers = "\n".join(r["output"] for r in sft_records(ms))
    for q in held_out_questions(ms):
        assert q["answer"] in train_text and q["answer"] in answers


def test_the_domain_is_deterministic_and_distinct() -> None:
    assert machines() == machines()
    ms = machines()
    assert len({m.name for m in ms}) == len({m.seal_kit for m in ms}) == len(ms)
    assert len({m.fault_code for m in ms}) == len(ms)


def test_demo_report_prints_figures_and_answers_side_by_side() -> None:
    import io

    from rich.console import Console

    from graft.demo import report

    qa = {
        "name": "plant-facts",
        "score": 0.0,
        "questions": 48,
        "examples": [
            {
                "question": "Which kit?",
                "expected": "VA-2606-W",
                "answer": "I do not know",
                "right": False,
            }
        ],
    }
    ev = {
        "baseline": {"loss": 4.7, "perplexity": 116.9, "score": 0.0, "datasets": [qa]},
        "stages": [
            {"name": "domain", "perplexity": 20.0, "score": 0.1, "datasets": []},
            {
                "name": "sft",
                "perplexity": 10.0,
                "score": 0.75,
                "datasets": [
                    {
                        **qa,
                        "score": 0.75,
                        "examples": [{**qa["examples"][0], "answer": "VA-2606-W", "right": True}],
                    }
                ],
            },
        ],
        "final": {
            "perplexity": 10.0,
            "score": 0.75,
            "datasets": [{**qa, "examples": [{**qa["examples"][0], "answer": "VA-2606-W"}]}],
        },
    }
    out = io.StringIO()
    ppl, gain = report(ev, Console(file=out, width=200))
    text = out.getvalue()
    assert "after domain" in text and "I do not know" in text and "VA-2606-W" in text
    assert ppl is not None and abs(ppl - (10.0 / 116.9 - 1)) < 1e-9
    assert gain == 0.75
