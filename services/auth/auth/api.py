"""HTTP routes of the auth service."""

from __future__ import annotations

import html
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import ValidationError

from auth import flows
from auth.schemas import (
    Accepted,
    AdminUserOut,
    AdminUserPage,
    AdminUserPatch,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyIdentity,
    ApiKeyLookup,
    ApiKeyOut,
    AuditEntry,
    AuditPage,
    CodeRequest,
    EmailRequest,
    ExchangedToken,
    LoginRequest,
    MfaDisableRequest,
    MfaLoginRequest,
    MfaRequired,
    PasswordChange,
    PasswordReset,
    ProfileOut,
    ProfileUpdate,
    RecoveryCodes,
    RefreshRequest,
    SessionOut,
    SignupRequest,
    TokenPair,
    TotpSetup,
    UserOut,
)
from auth.tokens import SigningKey
from herald.errors import ERROR_RESPONSES, ApiError
from herald.events.auth import UserChanged
from herald.security import Principal, admin, current_principal, full_access, internal_caller

router = APIRouter(responses=ERROR_RESPONSES)

PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'"


def _auth(request: Request) -> flows.Auth:
    runtime = request.app.state.runtime
    return flows.Auth(pool=runtime.db, settings=runtime.settings, key=runtime.extras["signing_key"])


def _client(request: Request) -> flows.Client:
    # The gateway appends the address it saw last; it is the only hop we trust.
    forwarded = request.headers.get("x-forwarded-for", "")
    ip = forwarded.split(",")[-1].strip() if forwarded else ""
    if not ip:
        ip = request.client.host if request.client else "unknown"
    return flows.Client(ip=ip[:64], user_agent=request.headers.get("user-agent"))


AuthDep = Annotated[flows.Auth, Depends(_auth)]
ClientDep = Annotated[flows.Client, Depends(_client)]
Caller = Annotated[Principal, Depends(current_principal)]
FullCaller = Annotated[Principal, Depends(full_access)]
Admin = Annotated[Principal, Depends(admin)]


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        "<body style='font-family:system-ui;max-width:34rem;margin:4rem auto'>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(
        document,
        status_code=status,
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


@router.get("/.well-known/jwks.json", tags=["auth"])
async def jwks(request: Request) -> dict[str, list[dict[str, str]]]:
    """The public keys that verify Herald's access tokens."""
    key = request.app.state.runtime.extras["signing_key"]
    assert isinstance(key, SigningKey)
    return {"keys": [key.jwk()]}


@router.post("/signup", status_code=201, response_model=UserOut, tags=["accounts"])
async def signup(body: SignupRequest, auth: AuthDep, client: ClientDep) -> Any:
    """Create an account; a confirmation link is mailed to the address."""
    user = await flows.signup(
        auth, username=body.username, email=body.email, password=body.password, client=client
    )
    return dict(user)


@router.get("/signup/confirm", tags=["accounts"], response_model=UserOut)
async def confirm(
    request: Request, auth: AuthDep, token: Annotated[str, Query(max_length=200)]
) -> Any:
    """Confirm an email address (the link in the confirmation mail)."""
    try:
        user = await flows.confirm_email(auth, token=token)
    except ApiError as exc:
        if _wants_html(request):
            return _page(
                "This link does not work", f"<p>{html.escape(exc.message)}</p>", exc.status
            )
        raise
    if _wants_html(request):
        return _page(
            "Address confirmed",
            f"<p>{html.escape(user['email'])} is confirmed. You can log in now.</p>",
        )
    return dict(user)


@router.post(
    "/signup/resend-confirmation", status_code=202, response_model=Accepted, tags=["accounts"]
)
async def resend_confirmation(body: EmailRequest, auth: AuthDep, client: ClientDep) -> Accepted:
    """Mail a new confirmation link (the answer is the same whether or not the account exists)."""
    await flows.resend_confirmation(auth, email=body.email, client=client)
    return Accepted()


@router.post("/login", response_model=TokenPair | MfaRequired, tags=["sessions"])
async def login(body: LoginRequest, auth: AuthDep, client: ClientDep) -> TokenPair | MfaRequired:
    """Log in with email and password; with MFA on, a second step follows at /login/mfa."""
    result = await flows.login(auth, email=body.email, password=body.password, client=client)
    if isinstance(result, flows.MfaChallenge):
        return MfaRequired(mfa_token=result.mfa_token)
    return TokenPair(
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        expires_in=result.expires_in,
    )


@router.post("/login/mfa", response_model=TokenPair, tags=["sessions"])
async def login_mfa(body: MfaLoginRequest, auth: AuthDep, client: ClientDep) -> TokenPair:
    """Finish a login with a TOTP code or a recovery code."""
    result = await flows.login_mfa(auth, mfa_token=body.mfa_token, code=body.code, client=client)
    return TokenPair(
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        expires_in=result.expires_in,
    )


@router.post("/token/refresh", response_model=TokenPair, tags=["sessions"])
async def refresh(body: RefreshRequest, auth: AuthDep) -> TokenPair:
    """Exchange a refresh token for new tokens (the old one stops working)."""
    result = await flows.refresh(auth, refresh_token=body.refresh_token)
    return TokenPair(
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        expires_in=result.expires_in,
    )


@router.post("/logout", status_code=204, tags=["sessions"])
async def logout(auth: AuthDep, principal: Caller) -> Response:
    """End the current session."""
    await flows.logout(auth, principal=principal)
    return Response(status_code=204)


@router.get("/sessions", response_model=list[SessionOut], tags=["sessions"])
async def list_sessions(auth: AuthDep, principal: FullCaller) -> Any:
    """Your live sessions."""
    return await flows.sessions(auth, principal=principal)


@router.delete("/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(session_id: uuid.UUID, auth: AuthDep, principal: FullCaller) -> Response:
    """End one of your sessions."""
    await flows.end_session(auth, principal=principal, session_id=session_id)
    return Response(status_code=204)


@router.post("/mfa/totp/setup", response_model=TotpSetup, tags=["mfa"])
async def totp_setup(auth: AuthDep, principal: FullCaller) -> TotpSetup:
    """Start TOTP: a secret to put in an authenticator app (confirm it with /mfa/totp/enable)."""
    secret, uri = await flows.totp_setup(auth, principal=principal)
    return TotpSetup(secret=secret, otpauth_uri=uri)


@router.post("/mfa/totp/enable", response_model=RecoveryCodes, tags=["mfa"])
async def totp_enable(body: CodeRequest, auth: AuthDep, principal: FullCaller) -> RecoveryCodes:
    """Turn TOTP on with a first code; returns one-time recovery codes (shown once)."""
    return RecoveryCodes(
        recovery_codes=await flows.totp_enable(auth, principal=principal, code=body.code)
    )


@router.post("/mfa/totp/disable", status_code=204, tags=["mfa"])
async def totp_disable(body: MfaDisableRequest, auth: AuthDep, principal: FullCaller) -> Response:
    """Turn TOTP off (password and a current code required)."""
    await flows.totp_disable(auth, principal=principal, password=body.password, code=body.code)
    return Response(status_code=204)


def _profile(user: Any) -> dict[str, Any]:
    return dict(user) | {"mfa_enabled": bool(user["mfa_secret"])}


@router.get("/profile", response_model=ProfileOut, tags=["profile"])
async def get_profile(auth: AuthDep, principal: FullCaller) -> Any:
    """Your profile."""
    return _profile(await flows.profile(auth, user_id=principal.user_id))


@router.put("/profile", response_model=ProfileOut, tags=["profile"])
async def put_profile(body: ProfileUpdate, auth: AuthDep, principal: FullCaller) -> Any:
    """Change your profile; a new email address takes effect once confirmed from its inbox."""
    changes = body.model_dump(exclude_unset=True)
    return _profile(await flows.update_profile(auth, principal=principal, changes=changes))


@router.post("/profile/password", status_code=204, tags=["profile"])
async def change_password(
    body: PasswordChange, auth: AuthDep, principal: FullCaller, client: ClientDep
) -> Response:
    """Change your password; every other session ends."""
    await flows.change_password(
        auth,
        principal=principal,
        current=body.current_password,
        new=body.new_password,
        client=client,
    )
    return Response(status_code=204)


@router.post("/password/forgot", status_code=202, response_model=Accepted, tags=["accounts"])
async def forgot_password(body: EmailRequest, auth: AuthDep, client: ClientDep) -> Accepted:
    """Mail a password reset link (the answer is the same whether or not the account exists)."""
    await flows.forgot_password(auth, email=body.email, client=client)
    return Accepted()


@router.get("/password/reset", include_in_schema=False)
async def reset_form(token: Annotated[str, Query(max_length=200)]) -> HTMLResponse:
    """The page the reset link opens: a form that posts the new password."""
    form = (
        "<form method=post action='/password/reset'>"
        f"<input type=hidden name=token value='{html.escape(token, quote=True)}'>"
        "<label>New password <input type=password name=new_password minlength=12 required "
        "autocomplete=new-password></label> <button>Set password</button></form>"
    )
    return _page("Choose a new password", form)


@router.post(
    "/password/reset",
    status_code=204,
    tags=["accounts"],
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": PasswordReset.model_json_schema()}}
        }
    },
)
async def reset_password(request: Request, auth: AuthDep, client: ClientDep) -> Response:
    """Set a new password with the token from a reset link; all sessions end."""
    body = await _reset_body(request)
    try:
        await flows.reset_password(
            auth, token=body.token, new_password=body.new_password, client=client
        )
    except ApiError as exc:
        if _wants_html(request):
            return _page(
                "The password was not changed", f"<p>{html.escape(exc.message)}</p>", exc.status
            )
        raise
    if _wants_html(request):
        return _page("Password changed", "<p>You can log in with your new password now.</p>")
    return Response(status_code=204)


async def _reset_body(request: Request) -> PasswordReset:
    # The mailed page posts a form; API clients post JSON. Both are validated the same way.
    try:
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = await request.form()
            return PasswordReset.model_validate({k: form.get(k) for k in ("token", "new_password")})
        return PasswordReset.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "validation_error", f"{field}: {first['msg']}", field=field) from None


@router.post("/api-keys", status_code=201, response_model=ApiKeyCreated, tags=["api keys"])
async def create_api_key(body: ApiKeyCreate, auth: AuthDep, principal: FullCaller) -> Any:
    """Create an API key for servers; the key is shown only in this answer."""
    row, key = await flows.create_api_key(
        auth, principal=principal, name=body.name, scope=body.scope
    )
    return dict(row) | {"key": key}


@router.get("/api-keys", response_model=list[ApiKeyOut], tags=["api keys"])
async def list_api_keys(auth: AuthDep, principal: FullCaller) -> Any:
    """Your API keys (without the keys themselves)."""
    return [dict(row) for row in await flows.list_api_keys(auth, principal=principal)]


@router.delete("/api-keys/{key_id}", status_code=204, tags=["api keys"])
async def delete_api_key(key_id: uuid.UUID, auth: AuthDep, principal: FullCaller) -> Response:
    """Revoke an API key."""
    await flows.delete_api_key(auth, principal=principal, key_id=key_id)
    return Response(status_code=204)


@router.get("/admin/users", response_model=AdminUserPage, tags=["admin"])
async def admin_users(
    auth: AuthDep,
    _: Admin,
    q: Annotated[str | None, Query(max_length=254)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Any:
    """Users, oldest first; `q` matches the start of an email or username."""
    rows, next_cursor = await flows.admin_users(auth, q=q, limit=limit, cursor=cursor)
    return {"items": [_profile(r) for r in rows], "next_cursor": next_cursor}


@router.get("/admin/users/{user_id}", response_model=AdminUserOut, tags=["admin"])
async def admin_user(user_id: uuid.UUID, auth: AuthDep, _: Admin) -> Any:
    """One user."""
    return _profile(await flows.profile(auth, user_id=user_id))


@router.patch("/admin/users/{user_id}", response_model=AdminUserOut, tags=["admin"])
async def admin_patch_user(
    user_id: uuid.UUID, body: AdminUserPatch, auth: AuthDep, principal: Admin, client: ClientDep
) -> Any:
    """Disable or enable a user, change their role or daily send quota (null: unlimited)."""
    changes = body.model_dump(exclude_unset=True)
    user = await flows.admin_update_user(
        auth, admin=principal, user_id=user_id, changes=changes, client=client
    )
    return _profile(user)


@router.post(
    "/admin/users/{user_id}/reset-password",
    status_code=202,
    response_model=Accepted,
    tags=["admin"],
)
async def admin_reset_password(
    user_id: uuid.UUID, auth: AuthDep, principal: Admin, client: ClientDep
) -> Accepted:
    """Mail the user a reset link and end their sessions."""
    await flows.admin_reset_password(auth, admin=principal, user_id=user_id, client=client)
    return Accepted()


@router.get("/admin/audit", response_model=AuditPage, tags=["admin"])
async def admin_audit(
    auth: AuthDep,
    _: Admin,
    user_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Any:
    """Who did what to whom, newest first; `user_id` narrows to one user."""
    rows, next_cursor = await flows.admin_audit(auth, target_id=user_id, limit=limit, cursor=cursor)
    return {"items": [AuditEntry.model_validate(dict(r)) for r in rows], "next_cursor": next_cursor}


@router.post(
    "/internal/api-keys/verify",
    response_model=ApiKeyIdentity,
    include_in_schema=False,
    dependencies=[Depends(internal_caller)],
)
async def verify_api_key(body: ApiKeyLookup, auth: AuthDep) -> Any:
    """The account an API key belongs to (for send requests arriving on Kafka)."""
    row = await flows.api_key_identity(auth, api_key=body.api_key)
    return {"account_id": row["user_id"], "user_id": row["user_id"], "scope": row["scope"]}


@router.post(
    "/internal/api-keys/exchange",
    response_model=ExchangedToken,
    include_in_schema=False,
    dependencies=[Depends(internal_caller)],
)
async def exchange_api_key(body: ApiKeyLookup, auth: AuthDep) -> Any:
    """A short-lived access token standing for an API key (the gateway calls this)."""
    token, expires_in, row = await flows.exchange_api_key(auth, api_key=body.api_key)
    return {
        "access_token": token,
        "expires_in": expires_in,
        "scope": row["scope"],
        "account_id": row["user_id"],
    }


@router.get(
    "/internal/users/{user_id}",
    response_model=UserChanged,
    include_in_schema=False,
    dependencies=[Depends(internal_caller)],
)
async def internal_user(user_id: uuid.UUID, auth: AuthDep) -> Any:
    """The user's current state, the fields of `user.changed` (for services that cannot wait
    for the event, like campaign deciding whether a new account may send)."""
    return await flows.current_user(auth, user_id=user_id)
