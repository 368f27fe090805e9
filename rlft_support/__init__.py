"""The plumbing of rlft.ipynb: installs, config, model/data assets, speed options, guards, run folders and
checkpoints, data parallelism, reports and the chat demo. Nothing here imports the notebook (or `nbimport`):
what a module needs from the method is handed in as an argument. No re-exports: import by module."""
