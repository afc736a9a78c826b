"""Evaluation: dual-path answer scoring (math-verify equivalence), benchmark loaders, mean@k accuracy and response length.

Nothing is imported here: `opsdc` imports the eval command at start-up, and math-verify (scoring.py)
takes about a second to import, so it is loaded only by the commands that score.
"""
