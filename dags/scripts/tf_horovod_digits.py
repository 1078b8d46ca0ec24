"""Train a small Keras model on the digits data with Horovod for TensorFlow. Run by hand with
``horovodrun -np 2 -H localhost:2 python tf_horovod_digits.py``.

Under Keras 3 (TF 2.21) Horovod's ``DistributedGradientTape`` and ``horovod.tensorflow.keras`` fail
(``'Variable' object has no attribute 'ref'``), so this all-reduces each gradient with ``hvd.allreduce``
in a custom loop. (``TF_USE_LEGACY_KERAS=1`` with ``tf_keras`` makes ``DistributedOptimizer`` work.)
"""

from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from digits import (
    keras_mlp,
    launcher_rank,
    load_digits_split,
    log_metrics,
    model_dir,
    parse_training_args,
    save_input_example,
    warm_up_tracking,
    write_summary,
)


def main() -> None:
    args = parse_training_args(lr=0.05, batch_size=32)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        warm_up_tracking()
    probe = hvd.allreduce(tf.constant(float(rank + 1)), op=hvd.Sum, name="probe")
    print(
        f"rank={rank} size={size} local_rank={hvd.local_rank()} launcher_rank={launcher_rank()} "
        f"allreduce_sum={float(probe)}"
    )

    (x_train, y_train), (x_test, y_test) = load_digits_split()
    x_shard, y_shard = x_train[rank::size], y_train[rank::size]
    tf.keras.utils.set_random_seed(rank)  # different on purpose: the broadcast below must make them equal
    model = keras_mlp()
    for variable in model.variables:
        variable.assign(hvd.broadcast(variable.value, root_rank=0, name=f"init_{variable.path}"))
    optimizer = tf.keras.optimizers.SGD(args.lr * size, momentum=0.9)
    loss_obj = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_obj(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        grads = [hvd.allreduce(g, op=hvd.Average, name=f"grad{i}") for i, g in enumerate(grads)]
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    steps = int(hvd.allreduce(tf.constant(len(x_shard) // args.batch_size), op=hvd.Min, name="steps"))
    for epoch in range(args.epochs):
        losses = [
            train_step(
                x_shard[s * args.batch_size : (s + 1) * args.batch_size],
                y_shard[s * args.batch_size : (s + 1) * args.batch_size],
            )
            for s in range(steps)
        ]
        mean_loss = float(hvd.allreduce(tf.reduce_mean(losses), name=f"loss{epoch}"))
        accuracy = float(np.mean(np.argmax(model(x_test).numpy(), 1) == y_test))
        print(f"epoch={epoch} loss={mean_loss:.4f} accuracy={accuracy:.4f}")
        if rank == 0:
            log_metrics({"loss": mean_loss, "accuracy": accuracy}, step=epoch)

    checksum = tf.reshape(tf.add_n([tf.reduce_sum(v) for v in model.trainable_variables]), [1])
    checksums = hvd.allgather(checksum, name="checksums").numpy().tolist()
    print(f"rank={rank} weights_checksum={float(checksum[0]):.6f}")
    if rank == 0:
        model.save(model_dir() / "model.keras")
        save_input_example(x_test[:5])
        write_summary(
            {
                "size": size,
                "allreduce_sum": float(probe),
                "final_loss": mean_loss,
                "accuracy": accuracy,
                "weights_checksums": checksums,
            }
        )


if __name__ == "__main__":
    main()
