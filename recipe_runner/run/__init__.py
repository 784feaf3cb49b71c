"""Run orchestration (the stage registry and `recipe run`) and the review tools: plan, diff, estimates."""
