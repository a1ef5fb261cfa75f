"""Rewards a tiny random policy can learn in a few CPU steps (dense signal, no reasoning needed)."""


def letter_e_share(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """Share of the response's non-space characters that are the letter 'e'."""
    text = "".join(solution_str.split())
    return text.count("e") / max(len(text), 1)
