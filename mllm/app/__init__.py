"""The web demo (`make app`, scripts/app.py): `core` holds what it computes as plain functions (testable without a
browser or gradio), `ui` the gradio page around them. gradio comes with the `app` extra."""
