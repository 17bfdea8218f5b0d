"""One module per stage, each ending in its declaration ``STAGE`` (``pipeline.stage.StageDef``):
the Ray orchestration of that stage over the pure functions of ``stages/``. The plan is
the ordered list of them (``pipeline/plan.py``). A declaration module never imports
another one: stages share facts through the run context."""
