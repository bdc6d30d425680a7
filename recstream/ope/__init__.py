"""Off-policy evaluation: the estimators (`estimators`), evaluation from production logs (`logs`),
and the trainer's window of live logs (`window`)."""
