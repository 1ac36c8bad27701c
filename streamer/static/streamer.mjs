// streamer.js as an ES module, for bundlers and <script type="module">:
//
//   import { TaskStream, TaskBoard } from "https://stream.example.com/static/streamer.mjs";
//
// It runs the same code as /static/streamer.js (which also sets the global Streamer);
// types are in streamer.d.mts next to it.
import "./streamer.js";

const Streamer = globalThis.Streamer;
export const { TaskStream, TaskBoard, CommandError } = Streamer;
export default Streamer;
