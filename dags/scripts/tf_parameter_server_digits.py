"""Train a small Keras model on the digits data with ParameterServerStrategy (reads TF_CONFIG).

The chief coordinates: it places variables on the parameter servers and schedules training steps on
the workers. Workers and parameter servers only run a TensorFlow server until they are stopped (the
launcher stops them once the chief finishes). Keras 3's ``model.fit`` does not work under this
strategy in TF 2.21, so the chief uses a custom loop with ``ClusterCoordinator``.
"""

from __future__ import annotations

import argparse
import os

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


def run_server(resolver: tf.distribute.cluster_resolver.TFConfigClusterResolver) -> None:
    server = tf.distribute.Server(
        resolver.cluster_spec(), job_name=resolver.task_type, task_index=resolver.task_id, protocol="grpc"
    )
    print(f"{resolver.task_type}:{resolver.task_id} serving at {server.target}", flush=True)
    server.join()


def train(resolver, args: argparse.Namespace) -> None:
    warm_up_tracking()
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    cluster = resolver.cluster_spec().as_dict()
    print(f"chief: {len(cluster.get('worker', []))} workers, {len(cluster.get('ps', []))} parameter servers")
    (x_train, y_train), (x_test, y_test) = load_digits_split()

    def dataset_fn():
        data = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        return data.shuffle(2048).repeat().batch(args.batch_size, drop_remainder=True)

    with strategy.scope():
        model = keras_mlp()
        optimizer = tf.keras.optimizers.SGD(args.lr, momentum=0.9)
    loss_obj = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    devices = sorted({v.value.device for v in model.trainable_variables})
    print(f"variables on: {devices}")
    iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))

    @tf.function
    def train_step(it):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_obj(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        x, y = next(it)
        return strategy.run(step, args=(x, y))

    steps = len(x_train) // args.batch_size
    losses = []
    for epoch in range(args.epochs):
        results = [coordinator.schedule(train_step, args=(iterator,)) for _ in range(steps)]
        coordinator.join()
        losses.append(float(np.mean([r.fetch() for r in results])))
        accuracy = float(np.mean(np.argmax(model(x_test).numpy(), 1) == y_test))
        print(f"epoch={epoch} loss={losses[-1]:.4f} accuracy={accuracy:.4f}")
        log_metrics({"loss": losses[-1], "accuracy": accuracy}, step=epoch)

    # The trained variables live on the parameter servers: a plain copy of the model is saved.
    trained = keras_mlp()
    trained.set_weights(model.get_weights())
    trained.save(model_dir() / "model.keras")
    save_input_example(x_test[:5])
    write_summary(
        {
            "devices": devices,
            "losses": losses,
            "accuracy": accuracy,
            "workers": len(cluster.get("worker", [])),
            "parameter_servers": len(cluster.get("ps", [])),
        }
    )


def main() -> None:
    args = parse_training_args(lr=0.1, batch_size=64)
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type in ("worker", "ps"):
        run_server(resolver)
    else:
        train(resolver, args)


if __name__ == "__main__":
    main()
