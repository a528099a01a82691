"""Classes in the store: budgets, rosters, starter notebooks and usage per student.

A class pays from its own account (``NAME@class``, role ``system``); its budget is that
account's balance. Budgets move in by an admin grant (from the mint) or a teacher's transfer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, case, func, insert, select, update
from sqlalchemy.engine import Connection

from jupyter_gpu_share import clock
from jupyter_gpu_share.ledger import credit_entries

from . import models
from .records import ClassRecord, Conflict, InsufficientFunds, NotFound, StudentUsage

accounts = models.Account.__table__
sessions = models.Session.__table__
transactions = models.Transaction.__table__
classes = models.Classroom.__table__
members = models.ClassMember.__table__
notebooks = models.ClassNotebook.__table__

_CLASS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,58}")


def check_class_name(name: object) -> None:
    """Raise ValueError unless ``name`` can name a class (as the class routes match it)."""
    if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
        raise ValueError(
            f"class name must be 1-58 characters of letters, digits, '_', '.', '-': {name!r}"
        )


_NOTEBOOK_NAME = re.compile(r"[^/\\\x00]{1,200}\.ipynb")
MAX_NOTEBOOK_BYTES = 16 * 1024 * 1024
_teacher = accounts.alias("teacher")
_budget = accounts.alias("budget")
_teacher_member = members.alias("teacher_member")

_SELECT_CLASS = (
    select(
        classes,
        _budget.c.name.label("account_name"),
        _budget.c.balance_micro.label("budget_micro"),
        _teacher.c.name.label("teacher_name"),
    )
    .join_from(classes, _budget, classes.c.account_id == _budget.c.id)
    .join(
        _teacher_member,
        and_(_teacher_member.c.class_id == classes.c.id, _teacher_member.c.role == "teacher"),
    )
    .join(_teacher, _teacher.c.id == _teacher_member.c.account_id)
)


def class_account_name(class_name: str) -> str:
    """The account a class's sessions are charged to."""
    return f"{class_name}@class"


def _class(row: Any) -> ClassRecord:
    return ClassRecord(
        id=row.id,
        name=row.name,
        account=row.account_name,
        teacher=row.teacher_name,
        budget_micro=row.budget_micro,
        quota_seconds=row.quota_seconds,
        quota_micro=row.quota_micro,
        weekly_quota_seconds=row.weekly_quota_seconds,
        gpu_model=row.gpu_model,
        max_price_per_second_micro=row.max_price_per_second_micro,
        starts_us=row.starts_us,
        ends_us=row.ends_us,
        created_us=row.created_us,
    )


def _optional_non_negative(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")


class ClassStore:
    """The class part of ``Store`` (mixed in; uses its engines and ledger posting)."""

    # Store provides: _writer, _write(), _reader, _account_id(), _post(), ensure_account(),
    # issue_token().
    _writer: Any
    _write: Any
    _reader: Any
    _account_id: Any
    _post: Any
    ensure_account: Any
    issue_token: Any

    def _class_row(self, connection: Connection, name: str) -> Any:
        row = connection.execute(_SELECT_CLASS.where(classes.c.name == name)).first()
        if row is None:
            raise NotFound(f"no class named {name!r}")
        return row

    def create_class(
        self,
        name: str,
        teacher: str,
        *,
        quota_seconds: int | None = None,
        quota_micro: int | None = None,
        weekly_quota_seconds: int | None = None,
        gpu_model: str | None = None,
        max_price_per_second_micro: int | None = None,
        starts_us: int | None = None,
        ends_us: int | None = None,
    ) -> ClassRecord:
        """Create a class taught by ``teacher``, with an empty budget account."""
        check_class_name(name)
        for field, value in (
            ("quota_seconds", quota_seconds),
            ("quota_micro", quota_micro),
            ("weekly_quota_seconds", weekly_quota_seconds),
            ("max_price_per_second_micro", max_price_per_second_micro),
        ):
            _optional_non_negative(field, value)
        if quota_seconds is None and quota_micro is None:
            raise ValueError("a class needs a per-student quota (seconds or credits)")
        if starts_us is not None and ends_us is not None and ends_us <= starts_us:
            raise ValueError("a class must end after it starts")
        account = class_account_name(name)
        self.ensure_account(account, "system")
        now = clock.now_us()
        with self._write() as connection:
            if connection.execute(select(classes.c.id).where(classes.c.name == name)).first():
                raise Conflict(f"a class named {name!r} already exists")
            class_id = connection.execute(
                insert(classes).values(
                    name=name,
                    account_id=self._account_id(connection, account),
                    quota_seconds=quota_seconds,
                    quota_micro=quota_micro,
                    weekly_quota_seconds=weekly_quota_seconds,
                    gpu_model=gpu_model or None,
                    max_price_per_second_micro=max_price_per_second_micro,
                    starts_us=starts_us,
                    ends_us=ends_us,
                    created_us=now,
                )
            ).inserted_primary_key[0]
            connection.execute(
                insert(members).values(
                    class_id=class_id,
                    account_id=self._account_id(connection, teacher),
                    role="teacher",
                    active=True,
                    added_us=now,
                )
            )
            return _class(self._class_row(connection, name))

    def fund_class(self, name: str, amount_micro: int, source: str, memo: str = "") -> ClassRecord:
        """Move credits into a class's budget from ``source`` (the mint for an admin grant)."""
        if not isinstance(amount_micro, int) or isinstance(amount_micro, bool) or amount_micro <= 0:
            raise ValueError(f"budget amount must be a positive integer, not {amount_micro!r}")
        with self._write() as connection:
            row = self._class_row(connection, name)
            source_row = connection.execute(
                select(accounts.c.id, accounts.c.role, accounts.c.balance_micro).where(
                    accounts.c.name == source
                )
            ).first()
            if source_row is None:
                raise NotFound(f"no account named {source!r}")
            if source_row.role != "system" and source_row.balance_micro < amount_micro:
                raise InsufficientFunds(
                    f"{source} has {source_row.balance_micro} micro-credits, "
                    f"not the {amount_micro} asked for the class budget"
                )
            ids = {source: source_row.id, row.account_name: row.account_id}
            transaction_id = connection.execute(
                insert(transactions).values(
                    kind="credit",
                    created_us=clock.now_us(),
                    memo=memo or f"budget for class {name} from {source}",
                )
            ).inserted_primary_key[0]
            self._post(
                connection,
                [(transaction_id, credit_entries(source, row.account_name, amount_micro), ids)],
            )
            return _class(self._class_row(connection, name))

    def get_class(self, name: str) -> ClassRecord:
        """Return a class, or raise NotFound."""
        with self._reader.connect() as connection:
            return _class(self._class_row(connection, name))

    def list_classes(self, member: str | None = None) -> list[ClassRecord]:
        """Every class, or those where ``member`` is an active teacher or student."""
        query = _SELECT_CLASS.order_by(classes.c.name)
        if member is not None:
            mine = (
                select(members.c.class_id)
                .join(accounts, accounts.c.id == members.c.account_id)
                .where(accounts.c.name == member, members.c.active.is_(True))
            )
            query = query.where(classes.c.id.in_(mine))
        with self._reader.connect() as connection:
            return [_class(row) for row in connection.execute(query)]

    def class_role(self, name: str, account: str) -> str | None:
        """'teacher' or 'student' when ``account`` is an active member of the class."""
        query = (
            select(members.c.role)
            .join(classes, classes.c.id == members.c.class_id)
            .join(accounts, accounts.c.id == members.c.account_id)
            .where(classes.c.name == name, accounts.c.name == account, members.c.active.is_(True))
        )
        with self._reader.connect() as connection:
            return connection.execute(query).scalar()

    def teacher_counts(self, teacher: str) -> tuple[int, int]:
        """How many classes ``teacher`` teaches, and how many distinct students they have."""
        teaching = (
            select(members.c.class_id)
            .join(accounts, accounts.c.id == members.c.account_id)
            .where(accounts.c.name == teacher, members.c.role == "teacher")
        )
        with self._reader.connect() as connection:
            class_count = connection.execute(
                select(func.count()).select_from(teaching.subquery())
            ).scalar_one()
            students = connection.execute(
                select(func.count(func.distinct(members.c.account_id))).where(
                    members.c.role == "student", members.c.class_id.in_(teaching)
                )
            ).scalar_one()
        return int(class_count), int(students)

    def add_students(self, name: str, students: Iterable[str]) -> dict[str, str | None]:
        """Enrol students, creating user accounts that do not exist yet.

        Returns each student's new token when this call created the account, else None.
        """
        wanted = list(dict.fromkeys(students))
        if not wanted:
            raise ValueError("no students given")
        tokens: dict[str, str | None] = {}
        for student in wanted:
            with self._reader.connect() as connection:
                existing = connection.execute(
                    select(accounts.c.role).where(accounts.c.name == student)
                ).scalar()
            if existing is not None and existing != "user":
                raise Conflict(f"{student!r} is a {existing} account, not a student")
            self.ensure_account(student, "user")
            tokens[student] = None if existing is not None else self.issue_token(student)
        now = clock.now_us()
        with self._write() as connection:
            class_id = self._class_row(connection, name).id
            for student in wanted:
                account_id = self._account_id(connection, student)
                found = connection.execute(
                    select(members.c.id, members.c.role).where(
                        members.c.class_id == class_id, members.c.account_id == account_id
                    )
                ).first()
                if found is None:
                    connection.execute(
                        insert(members).values(
                            class_id=class_id,
                            account_id=account_id,
                            role="student",
                            active=True,
                            added_us=now,
                        )
                    )
                elif found.role == "student":
                    connection.execute(
                        update(members).where(members.c.id == found.id).values(active=True)
                    )
        return tokens

    def remove_student(self, name: str, student: str) -> None:
        """Take a student off a class (their past usage stays)."""
        with self._write() as connection:
            class_id = self._class_row(connection, name).id
            result = connection.execute(
                update(members)
                .where(
                    members.c.class_id == class_id,
                    members.c.role == "student",
                    members.c.account_id
                    == select(accounts.c.id).where(accounts.c.name == student).scalar_subquery(),
                )
                .values(active=False)
            )
            if result.rowcount == 0:
                raise NotFound(f"{student!r} is not a student of {name!r}")

    def class_students(self, name: str) -> list[str]:
        """The active students of a class, by name."""
        query = (
            select(accounts.c.name)
            .join(members, members.c.account_id == accounts.c.id)
            .join(classes, classes.c.id == members.c.class_id)
            .where(classes.c.name == name, members.c.role == "student", members.c.active.is_(True))
            .order_by(accounts.c.name)
        )
        with self._reader.connect() as connection:
            self._class_row(connection, name)
            return list(connection.execute(query).scalars())

    def put_class_notebook(self, name: str, notebook: str, content: str) -> None:
        """Publish (or replace) a starter notebook of a class."""
        if not _NOTEBOOK_NAME.fullmatch(notebook):
            raise ValueError(f"notebook name must be a file name ending in .ipynb: {notebook!r}")
        if len(content.encode()) > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"notebook {notebook!r} is over {MAX_NOTEBOOK_BYTES} bytes")
        now = clock.now_us()
        with self._write() as connection:
            class_id = self._class_row(connection, name).id
            updated = connection.execute(
                update(notebooks)
                .where(notebooks.c.class_id == class_id, notebooks.c.name == notebook)
                .values(content=content, updated_us=now)
            )
            if updated.rowcount == 0:
                connection.execute(
                    insert(notebooks).values(
                        class_id=class_id, name=notebook, content=content, updated_us=now
                    )
                )

    def list_class_notebooks(self, name: str) -> list[tuple[str, int, int]]:
        """(name, updated_us, size in bytes) of each notebook of a class."""
        query = (
            select(notebooks.c.name, notebooks.c.updated_us, func.length(notebooks.c.content))
            .join(classes, classes.c.id == notebooks.c.class_id)
            .where(classes.c.name == name)
            .order_by(notebooks.c.name)
        )
        with self._reader.connect() as connection:
            self._class_row(connection, name)
            return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]

    def get_class_notebook(self, name: str, notebook: str) -> str:
        """The content of one notebook of a class."""
        query = (
            select(notebooks.c.content)
            .join(classes, classes.c.id == notebooks.c.class_id)
            .where(classes.c.name == name, notebooks.c.name == notebook)
        )
        with self._reader.connect() as connection:
            content = connection.execute(query).scalar()
        if content is None:
            raise NotFound(f"class {name!r} has no notebook {notebook!r}")
        return content

    def class_usage(self, name: str, week_start_us: int = 0) -> dict[str, StudentUsage]:
        """Ended sessions of a class, summed per student (seconds this week too)."""
        renter = accounts.alias("renter")
        query = (
            select(
                renter.c.name,
                func.coalesce(func.sum(sessions.c.billed_seconds), 0),
                func.coalesce(func.sum(sessions.c.amount_micro), 0),
                func.count(sessions.c.id),
                func.coalesce(
                    func.sum(
                        case(
                            (sessions.c.ready_us >= week_start_us, sessions.c.billed_seconds),
                            else_=0,
                        )
                    ),
                    0,
                ),
            )
            .join(renter, renter.c.id == sessions.c.renter_account_id)
            .where(sessions.c.class_name == name, sessions.c.state == "ended")
            .group_by(renter.c.name)
        )
        with self._reader.connect() as connection:
            return {
                row[0]: StudentUsage(
                    student=row[0],
                    seconds=int(row[1]),
                    amount_micro=int(row[2]),
                    sessions=int(row[3]),
                    week_seconds=int(row[4]),
                )
                for row in connection.execute(query)
            }
