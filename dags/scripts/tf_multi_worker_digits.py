"""Train a small Keras model on the digits data with MultiWorkerMirroredStrategy (reads TF_CONFIG).

Keras 3's ``model.fit`` does not work under this strategy in TF 2.21, so this uses a custom training
loop; gradients are all-reduced across workers by ``strategy.run``. Worker 0 saves the model.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import tensorflow as tf
from digits import (
    keras_mlp,
    load_digits_split,
    log_metrics,
    model_dir,
    parse_training_args,
    save_input_example,
    warm_up_tracking,
    write_summary,
)


def main() -> None:
    args = parse_training_args(lr=0.1, batch_size=64)
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {"type": "worker", "index": 0})
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    world = strategy.num_replicas_in_sync
    is_chief = task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0)

    if is_chief:
        warm_up_tracking()
    probe = strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        strategy.run(lambda: tf.constant(float(task["index"] + 1))),
        axis=None,
    )
    print(f"task={task['type']}:{task['index']} world_size={world} allreduce_sum={float(probe)}")

    (x_train, y_train), (x_test, y_test) = load_digits_split()
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(2048, seed=0)
        .repeat()
        .batch(args.batch_size, drop_remainder=True)
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    iterator = iter(strategy.experimental_distribute_dataset(dataset.with_options(options)))
    steps = len(x_train) // args.batch_size

    with strategy.scope():
        model = keras_mlp()
        optimizer = tf.keras.optimizers.SGD(args.lr, momentum=0.9)
        loss_obj = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def train_step(batch):
        def step(x, y):
            with tf.GradientTape() as tape:
                per_example = loss_obj(y, model(x, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=args.batch_size)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=batch), axis=None)

    losses = []
    for epoch in range(args.epochs):
        total = sum(float(train_step(next(iterator))) for _ in range(steps))
        losses.append(total / steps)
        accuracy = float(np.mean(np.argmax(model(x_test).numpy(), 1) == y_test))
        print(f"epoch={epoch} loss={losses[-1]:.4f} accuracy={accuracy:.4f}")
        if is_chief:
            log_metrics({"loss": losses[-1], "accuracy": accuracy}, step=epoch)

    checksum = float(sum(tf.reduce_sum(v) for v in model.trainable_variables))
    print(f"task={task['type']}:{task['index']} weights_checksum={checksum:.6f}")
    # Every worker saves (the strategy expects it); only the chief's copy is the job's output.
    target = model_dir() if is_chief else tempfile.mkdtemp()
    model.save(os.path.join(target, "model.keras"))
    if is_chief:
        save_input_example(x_test[:5])
        write_summary(
            {
                "world_size": world,
                "allreduce_sum": float(probe),
                "losses": losses,
                "accuracy": accuracy,
                "weights_checksum": checksum,
            }
        )


if __name__ == "__main__":
    main()
