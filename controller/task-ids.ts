/**
 * A task's id names its job and its place in the job: `t` + the job's id
 * without its `j` + `.` + the task's index in base 32, at least 4 digits
 * (so a job's ids sort in index order up to 1,048,576 tasks). The store
 * finds a task of a job stored as a column by its id alone
 * (controller/lmdb-task-columns.ts); ids of any other form (a store written
 * before this, tests' own ids) name no place and keep a record each.
 */
const INDEX_DIGITS = 4;

export function taskIdOf(jobId: string, index: number): string {
  return `t${jobId.slice(1)}.${index.toString(32).padStart(INDEX_DIGITS, "0")}`;
}

/**
 * The job and index an id names, or undefined. Only the canonical spelling
 * counts (the one {@link taskIdOf} makes), so two ids never name one place.
 */
export function placeOfTaskId(taskId: string): { jobId: string; index: number } | undefined {
  const dot = taskId.lastIndexOf(".");
  if (dot < 2 || taskId.charCodeAt(0) !== 0x74 /* t */ || taskId.length - dot - 1 > 8) return undefined;
  const index = Number.parseInt(taskId.slice(dot + 1), 32);
  if (!Number.isSafeInteger(index) || index < 0) return undefined;
  const jobId = `j${taskId.slice(1, dot)}`;
  return taskIdOf(jobId, index) === taskId ? { jobId, index } : undefined;
}
