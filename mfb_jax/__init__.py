"""mfb-jax: multi-modal factorized bilinear fusion for YouTube-8M video classification."""

from mfb_jax import cli as _cli

# Before anything here imports TensorFlow (tf.data only): without this, each entry point's
# bad-input line came after four lines of TensorFlow's C++ start-up notices.
_cli.quiet_tensorflow()
