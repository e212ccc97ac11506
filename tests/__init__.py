"""The test suite is an entry point like `make run`: it loads models from local folders only, so
it says so before anything imports transformers (tests.conftest imports the pipeline)."""

from kubesentiment.settings import use_local_models_only

use_local_models_only()
