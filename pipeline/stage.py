"""`python -m pipeline.stage NAME --config F [--set key=value ...]`: run one stage."""
from pipeline.cli import stage_main

if __name__ == "__main__":
    stage_main()
