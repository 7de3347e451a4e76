import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { background, login, logout, whoAmI, type Me } from "./api.js";
import { JobsPage } from "./jobs.js";
import { JobPage } from "./job.js";
import { HostPage, HostsPage } from "./hosts.js";
import { SubmitPage } from "./submit.js";
import { Alert } from "./ui.js";
import "./style.css";

/** The page a hash route names: #/jobs, #/jobs/ID, #/hosts, #/hosts/ID, #/submit. */
function useRoute(): string[] {
  const parse = () => (location.hash.replace(/^#\/?/, "") || "jobs").split("/").map(decodeURIComponent);
  const [route, setRoute] = useState(parse);
  useEffect(() => {
    const on = () => setRoute(parse());
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return route;
}

function App() {
  const [me, setMe] = useState<Me | undefined | null>(null);
  const [error, setError] = useState("");
  useEffect(() => {
    (async () => {
      // A one-time link is /login#SECRET: the secret never leaves the browser but in this one POST.
      if (location.pathname === "/login") {
        const token = location.hash.slice(1);
        history.replaceState(null, "", "/#/jobs");
        try {
          await login(token);
        } catch (err) {
          setError(err instanceof Error ? err.message : String(err));
        }
      }
      setMe(await whoAmI());
    })().catch((err: unknown) => setError(String(err)));
  }, []);
  const route = useRoute();
  if (me === null) return <p class="wait">Loading…</p>;
  if (!me)
    return (
      <main class="login">
        <h1>rexmesh console</h1>
        <Alert text={error} />
        <p>
          You are not logged in. Run <code>rexmesh console</code> with your operator certificate and open the link it prints (it works once, for two minutes).
        </p>
      </main>
    );
  const [page, id] = route;
  return (
    <>
      <header>
        <nav aria-label="main">
          <strong>rexmesh</strong>
          <a href="#/jobs" aria-current={page === "jobs" ? "page" : undefined}>Jobs</a>
          <a href="#/hosts" aria-current={page === "hosts" ? "page" : undefined}>Hosts</a>
          <a href="#/submit" aria-current={page === "submit" ? "page" : undefined}>Run</a>
        </nav>
        <span class="me">
          {me.identity}{" "}
          <button
            type="button"
            onClick={() => {
              background(logout().then(() => setMe(undefined)));
            }}
          >
            Log out
          </button>
        </span>
      </header>
      <main>
        {page === "jobs" && !id && <JobsPage />}
        {page === "jobs" && id && <JobPage key={id} jobId={id} />}
        {page === "hosts" && !id && <HostsPage />}
        {page === "hosts" && id && <HostPage key={id} hostId={id} />}
        {page === "submit" && <SubmitPage />}
      </main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
