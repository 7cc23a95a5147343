#!/usr/bin/env bash
# Runs once, when the postgres image initialises an empty data volume (docker-entrypoint-initdb.d), as the
# image's superuser `postgres`. Creates the role iothub runs as: the owner of the `iothub` database, so it can
# apply its own migrations, and nothing more (no superuser, no CREATEDB, no CREATEROLE, no replication).
# A superuser could read the server's files and run programs through COPY ... PROGRAM: iothub needs neither.
set -euo pipefail
# The file is a compose secret; IOTHUB_DB_PASSWORD_FILE points elsewhere (the test suite runs this script
# against its own PostgreSQL, then `iothub migrate` as the role it created).
password_file=${IOTHUB_DB_PASSWORD_FILE:-/run/secrets/iothub_db_password}
password=$(tr -d '\r\n' < "$password_file")
[ -n "$password" ] || { echo "init-iothub-role: $password_file is empty" >&2; exit 1; }
psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres --set=password="$password" <<'SQL'
CREATE ROLE iothub LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'password';
CREATE DATABASE iothub OWNER iothub;
REVOKE ALL ON DATABASE iothub FROM PUBLIC;
\connect iothub
-- PostgreSQL 15+ no longer lets every role create in `public`; make the owner explicit either way.
ALTER SCHEMA public OWNER TO iothub;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
