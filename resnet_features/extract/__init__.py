"""The extraction job: listing and fetching inputs, decode, the model stage, output units,
the writer, and the one module that composes them with Ray Data (`pipeline`)."""
