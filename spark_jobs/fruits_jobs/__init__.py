"""Code shared by the Spark jobs. Shipped to executors with --py-files; imports nothing from Airflow."""
