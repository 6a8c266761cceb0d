"""The embedded demo: a small pre-trained base model and a task it has not learned."""
