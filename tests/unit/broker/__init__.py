"""Unit tests of service/broker modules: fakes in place of sockets and the database."""
