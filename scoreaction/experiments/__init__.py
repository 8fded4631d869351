"""Experiments run on the library, reached through the CLI; nothing in the library imports them.

    quickstart.py        `scoreaction quickstart`: the whole RLHF loop on digits, with report.py's HTML
                         report (templates/report.html.j2)
    digits_loop.py       what the quickstart and the digits benchmark share: learn a reward from simulated
                         comparisons, the digits train config, image metrics
    digits_bench.py      `scoreaction bench --task digits`: algorithms on a reward learned from comparisons
    finetune_bench.py    `scoreaction bench`: optimality, solver robustness and cost on the exact tasks, with
                         finetune_config.py (settings, variants), finetune_jobs.py (the runs),
                         finetune_results.py (typed results) and finetune_report.py (Markdown and plots)
    feedback_bench.py    `scoreaction reward bench`: reward-model accuracy against the number of labels
    common.py            worker pools with pinned threads, and the machine a timing was measured on
"""
