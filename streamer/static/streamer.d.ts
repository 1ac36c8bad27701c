// Types of streamer.js, the classic script (<script src=".../streamer.js">): it defines the
// global `Streamer` (also `window.Streamer`) and exports nothing, so a TypeScript file may
// import its types (`import type { TaskState } from "./streamer.js"`) but no values: those
// come from the global, or from the ES module streamer.mjs (streamer.d.mts).
import type StreamerModule from "./streamer.mjs";

export type * from "./streamer.mjs";

declare global {
  var Streamer: typeof StreamerModule;
  interface Window {
    Streamer: typeof StreamerModule;
  }
}
