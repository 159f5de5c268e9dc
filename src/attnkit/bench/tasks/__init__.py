"""Quality-benchmark tasks as data: one module per task, registered by ``@register_task``.

A training loop needs only this::

    task = get_task("mqar")
    train = task.make("train", "cpu", seed=0)          # TaskData: inputs, targets, loss_mask, pad_mask
    for variant in task.variants("cpu"):              # test lengths, depths … ([{}] when one)
        test = task.make("test", "cpu", seed=0, **variant)
        score = task.score(model(test.inputs), test)  # task.metric.name, .higher_is_better
"""

from ._base import (
    ACCURACY,
    BITS_PER_BYTE,
    EXACT_MATCH,
    IGNORE,
    MSE,
    PRESETS,
    REGISTRY,
    Metric,
    Preset,
    Task,
    TaskData,
    accuracy,
    bits_per_byte,
    exact_match,
    get_task,
    list_tasks,
    mse,
    package_data,
    register_task,
    split_seed,
)

__all__ = [
    "ACCURACY",
    "BITS_PER_BYTE",
    "EXACT_MATCH",
    "IGNORE",
    "MSE",
    "PRESETS",
    "REGISTRY",
    "Metric",
    "Preset",
    "Task",
    "TaskData",
    "accuracy",
    "bits_per_byte",
    "exact_match",
    "get_task",
    "list_tasks",
    "mse",
    "package_data",
    "register_task",
    "split_seed",
]
