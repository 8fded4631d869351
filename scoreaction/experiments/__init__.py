"""Experiments run on the library, reached through the CLI; nothing in the library imports them.

    quickstart.py        `scoreaction quickstart`: the whole RLHF loop on digits, with report.py's HTML report
    finetune_bench.py    `scoreaction bench`: optimality, solver robustness and cost on the exact tasks
    digits_bench.py      `scoreaction bench --task digits`: algorithms on a reward learned from comparisons
    feedback_bench.py    `scoreaction reward bench`: reward-model accuracy against the number of labels
"""
