"""The web demo (`fakereasoning-demo`): a Gradio page over pipeline.inference's
Predictor. `app.py` builds the page, `cli.py` loads the model and serves it."""
