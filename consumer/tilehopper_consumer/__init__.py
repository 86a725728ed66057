"""The consumer: a job's queue -> downloads through the active proxy -> tiles/<x>_<y>_<zoom>.png."""
