"""Load tests against per-user decode-speed SLAs: the locust scenario (`locustfile.py`), the
headless run behind `dspark loadtest` (`runner.py`) and the SLA report (`report.py`)."""
