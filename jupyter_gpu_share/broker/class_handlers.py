"""REST handlers for classes: teachers manage, students use, admins fund."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import nbformat
from jupyter_server.auth.decorator import authorized
from tornado import web

from ..classes import Quota, remaining, week_start_us
from ..clock import now_us
from ..ledger import price_per_hour, price_per_second_from_hour
from ..store import ClassRecord
from ..store.classes import MAX_NOTEBOOK_BYTES, check_class_name
from .auth import bearer_token
from .handlers import API, BrokerAPIHandler, HeaderedError, int_field, iso_from_us, str_field
from .peers import FORWARDED_BY, PeerUnreachable, forward

MAX_STUDENTS_PER_CALL = 1000


def class_model(record: ClassRecord, role: str) -> dict[str, Any]:
    """The JSON of a class as its member (or an admin) sees it."""
    return {
        "name": record.name,
        "teacher": record.teacher,
        "your_role": role,
        "budget_micro": record.budget_micro,
        "quota_seconds": record.quota_seconds,
        "quota_micro": record.quota_micro,
        "weekly_quota_seconds": record.weekly_quota_seconds,
        "gpu_model": record.gpu_model,
        "max_price_per_hour_micro": None
        if record.max_price_per_second_micro is None
        else price_per_hour(record.max_price_per_second_micro),
        "starts_at": iso_from_us(record.starts_us),
        "ends_at": iso_from_us(record.ends_us),
        "kernel_name": class_kernel_name(record.name),
    }


def class_kernel_name(class_name: str) -> str:
    """The kernelspec a class's notebooks name (installed by `jupyter gpu-share class fetch`)."""
    return f"gpu-share-{class_name.lower()}"


def _date_us(body: dict[str, Any], name: str) -> int | None:
    value = str_field(body, name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise web.HTTPError(400, f"'{name}' must be an ISO date such as 2026-12-01") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1_000_000)


class ClassHandlerBase(BrokerAPIHandler):
    """Shared checks: who may see and who may manage a class."""

    async def member_role(self, name: str) -> str:
        """The caller's role in the class ('admin' for admins); 404 for outsiders."""
        if self.account.role == "admin":
            await self.broker.db.get_class(name)
            return "admin"
        role = await self.broker.db.class_role(name, self.account.name)
        if role is None:
            # The same answer whether the class does not exist or is someone else's.
            raise web.HTTPError(404, f"no class named {name!r}")
        return role

    async def require_teacher(self, name: str) -> str:
        """The caller teaches the class (or is an admin), else 403/404."""
        role = await self.member_role(name)
        if role not in ("teacher", "admin"):
            raise web.HTTPError(403, f"only the teacher of {name} can do this")
        return role


class ClassesHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        member = None if self.account.role == "admin" else self.account.name
        records = await self.broker.db.list_classes(member)
        roles = {
            r.name: await self.broker.db.class_role(r.name, self.account.name) or "admin"
            for r in records
        }
        self.write_json([class_model(r, roles[r.name]) for r in records])

    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.require_role("teacher", "admin")
        body = self.json_body()
        name = str_field(body, "name", required=True)
        check_class_name(name)  # 400 before anything is checked against the store
        teacher = self.account.name
        if self.account.role == "teacher":
            classes, _ = await self.broker.db.teacher_counts(teacher)
            limit = self.broker.settings.max_classes_per_teacher
            if classes >= limit:
                raise web.HTTPError(
                    403, f"a teacher may have at most {limit} classes; ask an admin"
                )
        if self.account.role == "admin" and body.get("teacher") is not None:
            teacher = str_field(body, "teacher", required=True)
            owner = await self.broker.db.get_account(teacher)
            if owner is None or owner.role != "teacher":
                # well formed, but the store holds no such teacher: a conflict, not a typo
                raise web.HTTPError(409, f"{teacher!r} is not a teacher account")
        max_price_hour = int_field(body, "max_price_per_hour_micro", minimum=0)
        budget = int_field(body, "budget_micro", minimum=0)
        # Every field is read (400 on a bad one) before anything is checked against the store.
        fields = {
            "quota_seconds": int_field(body, "quota_seconds", minimum=1),
            "quota_micro": int_field(body, "quota_micro", minimum=1),
            "weekly_quota_seconds": int_field(body, "weekly_quota_seconds", minimum=1),
            "gpu_model": str_field(body, "gpu_model"),
            "max_price_per_second_micro": (
                None if max_price_hour is None else price_per_second_from_hour(max_price_hour)
            ),
            "starts_us": _date_us(body, "starts_at"),
            "ends_us": _date_us(body, "ends_at"),
        }
        if (
            budget
            and self.account.role == "teacher"
            and await self.broker.db.balance(teacher) < budget
        ):
            raise web.HTTPError(
                402,
                f"a budget of {budget} micro-credits is more than your balance; "
                "ask an admin to grant it",
            )
        record = await self.broker.db.create_class(
            name,  # type: ignore[arg-type]
            teacher,  # type: ignore[arg-type]
            **fields,  # type: ignore[arg-type]
        )
        if budget:
            source = "mint" if self.account.role == "admin" else teacher
            record = await self.broker.db.fund_class(record.name, budget, source)  # type: ignore[arg-type]
        self.set_header(
            "Location", f"{self.base_url.rstrip('/')}/gpu-share/api/classes/{record.name}"
        )
        self.write_json(class_model(record, "teacher"), 201)


class ClassHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        role = await self.member_role(name)
        self.write_json(class_model(await self.broker.db.get_class(name), role))


class ClassBudgetHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        role = await self.require_teacher(name)
        amount = int_field(self.json_body(), "amount_micro", required=True, minimum=1)
        source = "mint" if role == "admin" else self.account.name
        record = await self.broker.db.fund_class(name, amount, source)  # type: ignore[arg-type]
        self.broker.credited(record.account, record.budget_micro)
        self.write_json(class_model(record, role))


class StudentsHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        await self.require_teacher(name)
        self.write_json(await self.broker.db.class_students(name))

    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        await self.require_teacher(name)
        students = self.json_body(max_bytes=256 * 1024).get("students")
        if (
            not isinstance(students, list)
            or not students
            or not all(isinstance(s, str) for s in students)
        ):
            raise web.HTTPError(400, "'students' must be a non-empty list of user names")
        if len(students) > MAX_STUDENTS_PER_CALL:
            raise web.HTTPError(400, f"at most {MAX_STUDENTS_PER_CALL} students per call")
        if self.account.role == "teacher":
            # Enrolling creates accounts: a teacher token must not mint them without bound.
            _, enrolled = await self.broker.db.teacher_counts(self.account.name)
            limit = self.broker.settings.max_students_per_teacher
            if enrolled + len(set(students)) > limit:
                raise web.HTTPError(
                    403,
                    f"a teacher may have at most {limit} students in all ({enrolled} now); "
                    "ask an admin",
                )
        tokens = await self.broker.db.add_students(name, students)
        self.write_json(
            {
                "added": list(tokens),
                "new_accounts": {student: token for student, token in tokens.items() if token},
            }
        )


async def stop_elsewhere(handler: BrokerAPIHandler, name: str, student: str) -> list[str]:
    """Ask the other brokers that run a student's kernels of a class to stop them (the
    teacher's request, sent on with the teacher's token); the sessions they stopped."""
    if handler.request.headers.get(FORWARDED_BY):
        return []  # sent on by a broker: only this one's kernels
    stopped: list[str] = []
    for url, session_id in (await handler.broker.class_sessions_elsewhere(name, student)).items():
        try:
            answer = await forward(
                url,
                "POST",
                f"{API}/classes/{name}/students/{student}/stop",
                authorization=f"Bearer {bearer_token(handler)}",
                broker_id=handler.broker.broker_id,
                body={},
            )
        except PeerUnreachable as error:
            raise HeaderedError(
                503,
                f"session {session_id} runs on a broker that did not answer ({error}); try again",
                {"Retry-After": 2},
            ) from None
        if answer.status != 200:
            raise web.HTTPError(502, f"the broker serving session {session_id} refused the stop")
        try:
            stopped += json.loads(answer.body).get("stopped_sessions", [])
        except (ValueError, AttributeError):
            stopped.append(session_id)
    return stopped


class StudentHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def delete(self, name: str, student: str) -> None:
        await self.require_teacher(name)
        await self.broker.stop_student(name, student)
        await stop_elsewhere(self, name, student)
        await self.broker.db.remove_student(name, student)
        self.write_json({"removed": student})


class StopStudentHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def post(self, name: str, student: str) -> None:
        await self.require_teacher(name)
        ended = await self.broker.stop_student(name, student)
        there = await stop_elsewhere(self, name, student)  # on the other brokers
        # A stop the store could not settle yet (None) is pending, billed to now all the same.
        stopping = [
            live.id
            for live in self.broker.sessions.values()
            if live.class_name == name
            and live.renter == student
            and live.id in self.broker.pending_stops
        ]
        self.write_json(
            {
                "student": student,
                "stopped_sessions": [r.id for r in ended if r is not None] + there,
                "stopping_sessions": stopping,
            }
        )


class NotebooksHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        await self.member_role(name)
        self.write_json(
            [
                {"name": nb, "updated_at": iso_from_us(updated), "size": size}
                for nb, updated, size in await self.broker.db.list_class_notebooks(name)
            ]
        )


class NotebookHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def get(self, name: str, notebook: str) -> None:
        await self.member_role(name)
        record = await self.broker.db.get_class(name)
        content = json.loads(await self.broker.db.get_class_notebook(name, notebook))
        metadata = content.setdefault("metadata", {})
        # Opening (or running headless) a class notebook starts its kernel on the class pool.
        metadata["kernelspec"] = {
            "name": class_kernel_name(name),
            "display_name": f"Python 3 ({name} class GPU)",
            "language": "python",
        }
        metadata["gpu_share"] = {"class": name, "gpu_model": record.gpu_model}
        self.write_json(content)

    @web.authenticated
    @authorized
    async def put(self, name: str, notebook: str) -> None:
        await self.require_teacher(name)
        content = self.json_body(max_bytes=MAX_NOTEBOOK_BYTES)
        check_notebook(content)
        await self.broker.db.put_class_notebook(name, notebook, json.dumps(content))
        self.write_json({"name": notebook, "class": name}, 201)


def check_notebook(content: dict[str, Any]) -> None:
    """Answer 400 unless ``content`` is a valid nbformat 4 notebook (nbformat's own schema):
    students open it as it is, so a broken one must not be published."""
    minor = content.get("nbformat_minor")
    if (
        content.get("nbformat") != 4
        or not isinstance(minor, int)
        or isinstance(minor, bool)
        or not 0 <= minor <= nbformat.current_nbformat_minor
    ):
        raise web.HTTPError(
            400,
            f"the body must be an nbformat 4 notebook (nbformat_minor 0 to "
            f"{nbformat.current_nbformat_minor})",
        )
    try:
        nbformat.validate(nbformat.from_dict(content))
    except nbformat.ValidationError as error:
        first = str(error.message).splitlines()[0][:200]
        raise web.HTTPError(400, f"not a valid notebook: {first}") from None


class UsageHandler(ClassHandlerBase):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        role = await self.member_role(name)
        record = await self.broker.db.get_class(name)
        students = await self.broker.db.class_students(name)
        if role == "student":
            students = [self.account.name]
        quota = Quota(record.quota_seconds, record.quota_micro, record.weekly_quota_seconds)
        now = now_us()
        ended = await self.broker.db.class_usage(name, week_start_us(now))
        rows = []
        for student in students:
            used = await self.broker.class_used(name, student)
            seconds_left, micro_left = remaining(quota, used)
            running = [
                s
                for s in self.broker.sessions.values()
                if s.class_name == name and s.renter == student
            ]
            rows.append(
                {
                    "student": student,
                    "seconds": used.seconds,
                    "credits_micro": used.micro,
                    "sessions": (ended[student].sessions if student in ended else 0) + len(running),
                    "running": [s.id for s in running],
                    "remaining_seconds": None if seconds_left is None else max(0, seconds_left),
                    "remaining_micro": None if micro_left is None else max(0, micro_left),
                }
            )
        self.write_json(
            {
                "class": name,
                # What is left now: settled spending and the running kernels' cost so far.
                "budget_micro": record.budget_micro - self.broker.committed(record.account)
                if role != "student"
                else None,
                "students": rows,
                "at": iso_from_us(now),
            }
        )


def class_handlers(api: str) -> list[tuple[str, type]]:
    """The class routes."""
    cls = r"(?P<name>[A-Za-z0-9_.-]{1,58})"
    student = r"(?P<student>[A-Za-z0-9_.@-]{1,64})"
    return [
        (rf"{api}/classes", ClassesHandler),
        (rf"{api}/classes/{cls}", ClassHandler),
        (rf"{api}/classes/{cls}/budget", ClassBudgetHandler),
        (rf"{api}/classes/{cls}/students", StudentsHandler),
        (rf"{api}/classes/{cls}/students/{student}", StudentHandler),
        (rf"{api}/classes/{cls}/students/{student}/stop", StopStudentHandler),
        (rf"{api}/classes/{cls}/notebooks", NotebooksHandler),
        (rf"{api}/classes/{cls}/notebooks/(?P<notebook>[^/]+\.ipynb)", NotebookHandler),
        (rf"{api}/classes/{cls}/usage", UsageHandler),
    ]
