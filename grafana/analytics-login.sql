-- A login role for Grafana in the local docker-compose stack: member of pointgate_analytics (read-only,
-- created by migrations/0003). Run by the one-shot `analytics-login` service after `migrate`:
--   psql -v user=grafana -v password=... -f analytics-login.sql
-- Idempotent: an existing role only gets its password and membership refreshed.
SELECT format('CREATE ROLE %I LOGIN', :'user')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'user', :'password') \gexec
SELECT format('GRANT pointgate_analytics TO %I', :'user') \gexec
