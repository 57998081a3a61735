"""One module per stage of build-alma-r: a plain `run_<stage>` function over files and a thin Prefect task."""
