"""aekit training: input pipeline, models, tf.distribute training loop and SavedModel export."""
