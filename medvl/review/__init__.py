"""The reviewer's loop: /extract results filed for review, corrected item by item, kept in a
database (SQLite by default, PostgreSQL by URL), and exported as training rows for phase 5."""
