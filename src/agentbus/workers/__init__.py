"""Workers: the run queue's competing consumers, live output, and the auto-reply reactor."""
