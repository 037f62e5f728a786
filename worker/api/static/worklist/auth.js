// Login for the worklist pages: where the bearer token comes from, where it is kept, and how requests carry it.
//
// The server says which login it uses (GET config -> {login: "token" | "oidc", oidc: {...}}). "token" is a bearer
// token typed on the login page and kept in sessionStorage (gone when the tab closes). An OpenID Connect login
// would be another entry in LOGINS with the same two methods: start() on the login page, and a token() that the
// pages read; nothing else in the pages knows how the token was obtained.
//
// Pages a browser navigates to (the fairness report) cannot send the token in a header: after the login check the
// page opens a browser session (POST ../session with the token; an HttpOnly, SameSite=Strict cookie that scripts
// cannot read and other sites' pages do not send; worker/api/session.py). Signing out closes it.

const TOKEN_KEY = "triage.worklist.token";
// The roles the worklist's data routes accept (worker/api/worklist.py).
const READER_ROLES = ["radiologist", "admin"];

export async function pageConfig() {
  const response = await fetch("config", { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`config: HTTP ${response.status}`);
  return response.json();
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// Only a page of this site may be a return address after login (no open redirect). The browser, not a prefix
// test, decides where a URL leads: it drops tabs and newlines and reads a backslash as "/", so "/<tab>/evil" and
// "/<backslash>evil" are other sites. The address is resolved as location.assign would resolve it, kept only if it
// stays on this origin, and returned absolute (a path such as "/.//evil" would turn protocol-relative again).
export function safeNext(next) {
  if (!next || !next.startsWith("/")) return "./";
  let url;
  try {
    url = new URL(next, location.href);
  } catch {
    return "./";
  }
  return url.origin === location.origin ? url.href : "./";
}

function goToLogin() {
  const next = location.pathname + location.search;
  location.assign("login?next=" + encodeURIComponent(next));
}

export function requireLogin() {
  if (!token()) {
    goToLogin();
    return false;
  }
  return true;
}

// The session cookie for the server-rendered pages; the worklist itself works without it.
async function openSession(secret) {
  const response = await fetch("../session", { method: "POST", credentials: "same-origin",
    headers: { Accept: "application/json", Authorization: `Bearer ${secret}` } });
  return response.ok;
}

export async function logout() {
  forget();
  await fetch("../session", { method: "DELETE", credentials: "same-origin" }).catch(() => {});
  location.assign("login");
}

// fetch() with the bearer token; a 401 means the token is no longer accepted: back to the login page.
export async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}), Authorization: `Bearer ${token()}` };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    forget();
    goToLogin();
    throw new Error("not logged in");
  }
  return response;
}

// Downloads a protected file (the SR) with the token, as a file save.
export async function download(path, filename) {
  const response = await api(path, { headers: { Accept: "application/dicom" } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

export const LOGINS = {
  token: {
    // Checks the typed token against the API before keeping it.
    async start(secret) {
      const response = await fetch("me", { headers: { Accept: "application/json", Authorization: `Bearer ${secret}` } });
      if (response.status === 401 || response.status === 403) return { ok: false, error: "This token is not accepted." };
      if (!response.ok) return { ok: false, error: `The server answered ${response.status}; try again.` };
      const principal = await response.json();
      if (!READER_ROLES.includes(principal.role)) {
        return { ok: false, error: `This token (role ${principal.role}) may not read the worklist.` };
      }
      sessionStorage.setItem(TOKEN_KEY, secret);
      await openSession(secret).catch(() => false);
      return { ok: true, principal };
    },
  },
  oidc: {
    async start() {
      return { ok: false, error: "This worklist is configured for OpenID Connect, which this version does not implement yet." };
    },
  },
};
