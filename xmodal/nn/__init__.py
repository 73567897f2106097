"""Neural building blocks that teachers and students both use (recogniser encoders and decoders)."""
