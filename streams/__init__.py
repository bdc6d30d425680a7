"""Stream processors: catalog indexing, session features, recommendations, feedback.

Build the app with `streams.app.create_app`; run it with `python -m streams.worker`.
"""
