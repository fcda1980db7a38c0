-- One database per service on the team's PostgreSQL (run once, by the postgres image).
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
CREATE DATABASE prefect;
