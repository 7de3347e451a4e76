import { useEffect, useState } from "preact/hooks";
import { background, describeError } from "./api.js";

/** A table's column headings. */
export function Heads({ cols }: { cols: readonly string[] }) {
  return (
    <thead>
      <tr>
        {cols.map((c) => (
          <th scope="col" key={c}>
            {c}
          </th>
        ))}
      </tr>
    </thead>
  );
}

/** An error the screen reader announces. */
export function Alert({ text }: { text: string }) {
  return text ? (
    <p role="alert" class="error">
      {text}
    </p>
  ) : null;
}

/**
 * What `load` answers, asked again every `everyMs` while the page shows it
 * (and when `key` changes); the error of the last try, if it failed.
 */
export function usePolled<T>(load: () => Promise<T>, initial: T, everyMs: number, key: unknown = undefined): { value: T; error: string } {
  const [value, setValue] = useState<T>(initial);
  const [error, setError] = useState("");
  useEffect(() => {
    let stop = false;
    const once = () =>
      load().then(
        (v) => !stop && (setValue(v), setError("")),
        (err: unknown) => !stop && setError(describeError(err)),
      );
    background(once());
    const t = setInterval(() => background(once()), everyMs);
    return () => {
      stop = true;
      clearInterval(t);
    };
  }, [key]);
  return { value, error };
}
